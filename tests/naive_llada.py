"""An independent, naive LLaDA: the official forward and sampler re-written
from their published description in plain torch, as the test oracle. From llada
only the specification of the sampling noise is imported (the Gumbel noise of a
key, and the key of a step); the weights are read from the checkpoint folder
directly.

Slow on purpose: explicit loops over heads and rows, repeat_interleave for GQA,
the additive key-padding bias of the official code, float64 softmax for the
confidences, per-row Python ranking with an explicit tie-break.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

# The documented noise of a temperature: Gumbel(0, 1) per (key, row key,
# vocabulary column), and the key of a step of a block under a seed.
from llada.ops import gumbel_noise_reference
from llada.sampler import step_seed


class NaiveLLaDA:
    def __init__(self, folder, dtype=torch.float32):
        folder = Path(folder)
        self.cfg = json.loads((folder / "config.json").read_text())
        index = folder / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        self.w = {}
        for f in files:
            self.w.update({k: v.to(dtype) for k, v in load_file(str(folder / f)).items()})
        self.dtype = dtype
        tok = json.loads((folder / "tokenizer.json").read_text())
        self.eot_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|eot_id|>")

    def rms_norm(self, x, weight):
        x32 = x.to(torch.float32)
        var = (x32 * x32).mean(dim=-1, keepdim=True)
        return weight * (x32 / torch.sqrt(var + self.cfg["rms_norm_eps"])).to(x.dtype)

    def rope(self, t, positions):
        """t [B, H, L, D]: half-split rotation in float32 at ``positions`` [L]."""
        d = t.shape[-1]
        theta = self.cfg["rope_theta"]
        inv_freq = torch.tensor([1.0 / theta ** (i / d) for i in range(0, d, 2)], dtype=torch.float32)
        ang = torch.outer(positions.to(torch.float32), inv_freq)
        ang = torch.cat([ang, ang], dim=-1)
        t32 = t.to(torch.float32)
        x1, x2 = t32[..., : d // 2], t32[..., d // 2 :]
        rotated = torch.cat([-x2, x1], dim=-1)
        return (t32 * ang.cos() + rotated * ang.sin()).to(t.dtype)

    @torch.no_grad()
    def forward(self, ids, attention_mask=None, *, record=None, stale=None, lo=0, hi=None):
        """Logits [B, L, V] of the whole canvas ``ids``.

        ``record``: a list that receives each layer's (keys after RoPE,
        values), [B, Hkv, L, D] each. With ``stale`` (such a list, from an
        earlier canvas), only positions ``lo:hi`` of ``ids`` are run: their
        own keys and values replace the stale ones there, the rest are the
        stale ones (what a KV cache holds), and the logits are theirs only.
        """
        c, w = self.cfg, self.w
        b, l = ids.shape
        hi = l if hi is None else hi
        if stale is None:
            lo, hi = 0, l
        positions = torch.arange(lo, hi)
        n = hi - lo
        nh = c["n_heads"]
        nkv = c.get("n_kv_heads") or nh
        hd = c["d_model"] // nh
        if attention_mask is not None:
            keep = attention_mask.to(torch.float32)[:, None, None, :]
            bias = ((1.0 - keep) * torch.finfo(torch.float32).min).to(self.dtype)
        x = w["model.transformer.wte.weight"][ids[:, lo:hi]]
        for i in range(c["n_layers"]):
            p = f"model.transformer.blocks.{i}."
            a = self.rms_norm(x, w[p + "attn_norm.weight"])
            q = (a @ w[p + "q_proj.weight"].T).view(b, n, nh, hd).transpose(1, 2)
            k = (a @ w[p + "k_proj.weight"].T).view(b, n, nkv, hd).transpose(1, 2)
            v = (a @ w[p + "v_proj.weight"].T).view(b, n, nkv, hd).transpose(1, 2)
            q, k = self.rope(q, positions), self.rope(k, positions)
            if stale is not None:
                old_k, old_v = stale[i]
                k = torch.cat([old_k[:, :, :lo], k, old_k[:, :, hi:]], dim=2)
                v = torch.cat([old_v[:, :, :lo], v, old_v[:, :, hi:]], dim=2)
            if record is not None:
                record.append((k, v))
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
            heads = []
            for h in range(nh):
                s = q[:, h] @ k[:, h].transpose(-1, -2) / math.sqrt(hd)
                if attention_mask is not None:
                    s = s + bias[:, 0]
                heads.append(torch.softmax(s, dim=-1) @ v[:, h])
            y = torch.stack(heads, dim=2).reshape(b, n, nh * hd)
            x = x + y @ w[p + "attn_out.weight"].T
            m = self.rms_norm(x, w[p + "ff_norm.weight"])
            gate = torch.nn.functional.silu(m @ w[p + "ff_proj.weight"].T)
            x = x + (gate * (m @ w[p + "up_proj.weight"].T)) @ w[p + "ff_out.weight"].T
        x = self.rms_norm(x, w["model.transformer.ln_f.weight"])
        head = w["model.transformer.wte.weight" if c.get("weight_tying") else "model.transformer.ff_out.weight"]
        return x @ head.T


def transfer_counts(n: int, steps: int) -> list[int]:
    return [n // steps + (1 if s < n % steps else 0) for s in range(steps)]


@torch.no_grad()
def naive_generate(
    forward,
    prompt,
    attention_mask=None,
    steps=128,
    gen_length=128,
    block_length=128,
    cfg_scale=0.0,
    remasking="low_confidence",
    mask_id=None,
    eos_id=None,
    eot_id=None,
    logits_eos_inf=False,
    confidence_eos_eot_inf=False,
    seed=0,
    softmax_dtype=torch.float64,
    temperature=0.0,
    row_keys=None,
):
    """The official LLaDA sampler, with its faults fixed: CFG works without a
    mask, EOS/EoT predictions rank last (still candidates), and the confidence
    softmax runs in ``softmax_dtype``.

    ``forward(ids, attention_mask) -> logits [B, L, V]`` over the whole canvas.
    Ranking: confidence descending, lower position first on ties. 'random'
    remasking draws torch.rand(B, L) from a CPU generator seeded with ``seed``,
    once per step.

    ``temperature`` 0 predicts the argmax; > 0 the argmax, in float64, of
    logits / temperature + Gumbel noise, the documented sample of
    softmax(logits / temperature). The noise of a masked position at step s of
    its block is gumbel_noise_reference(step_seed(seed, s), [key], V) with
    key = row key * gen_length + place in the answer; a row's key is its index
    in the batch, or its entry of ``row_keys``. The confidence stays the
    probability of the prediction under softmax(logits).
    """
    b, lp = prompt.shape
    x = torch.full((b, lp + gen_length), mask_id, dtype=torch.long)
    x[:, :lp] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(b, gen_length, dtype=attention_mask.dtype)], 1)
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    gen = torch.Generator().manual_seed(seed)
    row_keys = list(range(b)) if row_keys is None else list(row_keys)
    for blk in range(num_blocks):
        start, end = lp + blk * block_length, lp + (blk + 1) * block_length
        counts = [transfer_counts(int((x[r, start:end] == mask_id).sum()), steps_per_block) for r in range(b)]
        for step in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                both = forward(torch.cat([x, un_x]), am)
                cond, un = both[:b], both[b:]
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = forward(x, attention_mask)
            if logits_eos_inf:
                logits[:, :, eos_id] = -math.inf
            x0 = logits.argmax(dim=-1)
            if temperature > 0:
                for r in range(b):
                    for i in range(start, end):
                        if mask_index[r, i]:
                            key = row_keys[r] * gen_length + (i - lp)
                            noise = gumbel_noise_reference(step_seed(seed, step), [key], logits.shape[-1])[0]
                            x0[r, i] = int((logits[r, i].double() / temperature + noise).argmax())
            if remasking == "low_confidence":
                p = torch.softmax(logits.to(softmax_dtype), dim=-1)
                conf = p.gather(-1, x0[..., None])[..., 0]
            else:
                conf = torch.rand(x.shape, generator=gen)
            for r in range(b):
                cand = [i for i in range(start, end) if mask_index[r, i]]
                last = {eos_id, eot_id} if confidence_eos_eot_inf else set()
                ranked = sorted(cand, key=lambda i: (int(x0[r, i]) in last, -float(conf[r, i]), i))
                for i in ranked[: counts[r][step]]:
                    x[r, i] = x0[r, i]
    return x


def naive_answers(folder, tokenizer, texts, steps, gen_length, block_length):
    """The oracle's greedy answers, as text, to prompts decoded as one batch:
    encoded by ``tokenizer`` (no special tokens added), left-padded with EOS,
    the padding masked out, each answer cut at its first EOS/EoT and decoded
    without special tokens."""
    oracle = NaiveLLaDA(folder)
    eos_id, mask_id = oracle.cfg["eos_token_id"], oracle.cfg["mask_token_id"]
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(map(len, rows))
    prompt = torch.tensor([[eos_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = naive_generate(oracle.forward, prompt, mask if len(set(map(len, rows))) > 1 else None,
                         steps=steps, gen_length=gen_length, block_length=block_length,
                         mask_id=mask_id, eos_id=eos_id, eot_id=oracle.eot_id)
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in (eos_id, oracle.eot_id)), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return answers
