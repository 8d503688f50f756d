"""llada.log_likelihood: what it takes as the model."""

import math

import pytest
import torch

import llada
from checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return llada.load(make_checkpoint(tmp_path_factory.mktemp("likelihood")), device="cpu")


def test_an_engine_is_refused_with_the_way_to_its_model(engine):
    # Before, it blamed mask_id, and with mask_id given, failed calling the Engine.
    for kw in (dict(), dict(mask_id=2)):
        with pytest.raises(TypeError, match=r"^model: expected a model .*got an Engine: pass engine\.model, "
                                            r"or call engine\.log_likelihood\(\.\.\.\), which takes text$"):
            llada.log_likelihood(engine, [5, 6], [7, 8], mc_num=4, batch_size=4, **kw)


@pytest.mark.parametrize("model,got", [(None, "NoneType"), ({"weight": torch.zeros(2)}, "dict")])
def test_what_is_no_model_is_refused_by_name(model, got):
    with pytest.raises(TypeError, match=rf"^model: expected a model called as model\(ids\)\.logits .*got {got}$"):
        llada.log_likelihood(model, [5, 6], [7, 8], mc_num=4, batch_size=4, mask_id=2)


def test_the_engines_model_and_any_callable_with_logits_are_taken(engine):
    # Uniform logits over V tokens cost log V per masked token, and a draw of
    # l masked tokens weighs them by L / l: every draw, and so the estimate,
    # is -L log V, whatever the draws.
    vocab, answer = 16, [7, 8, 9]

    def uniform(ids):  # a plain function: no parameters, no config
        return type("Out", (), {"logits": torch.zeros(*ids.shape, vocab)})()

    got = llada.log_likelihood(uniform, [5, 6], answer, mc_num=8, batch_size=4, mask_id=3, seed=0)
    assert math.isclose(got, -len(answer) * math.log(vocab), rel_tol=1e-6)

    class Uniform(torch.nn.Module):  # a module without parameters: computes where the prompt is
        def forward(self, ids):
            return uniform(ids)

    got = llada.log_likelihood(Uniform(), [5, 6], answer, mc_num=8, batch_size=4, mask_id=3, seed=0)
    assert math.isclose(got, -len(answer) * math.log(vocab), rel_tol=1e-6)
    assert math.isfinite(llada.log_likelihood(engine.model, [5, 6], answer, mc_num=4, batch_size=4, seed=0))
