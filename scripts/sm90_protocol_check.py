"""A model check of the barrier protocol of csrc/cuda/attention_sm90.cu.

The kernel's producer thread, its consumer warpgroups and the TMA unit are
run as actors under random interleavings, for random launches (stages,
consumers, Q buffers, O stored through the Q buffer or not, an item's last
P V chained to the next item or not, a step's P V overlapped with the
softmax or not, key tiles, splits, query tiles, grid size), with the semantics of mbarriers (arrival
counts, transaction bytes, phase parity) and of named barriers (bar.sync /
bar.arrive of 128 threads each). It checks that no launch deadlocks, that
every MMA reads the Q, K or V tile it means to, that no copy lands in a
stage while an MMA or a store reads it, that every store of O reads the O
its warpgroup wrote, that an item's output is written after all of its
P V and before the next item's, and that no named barrier is left
half-arrived. Its control flow is a transcription of the kernel's: change
both together, and rerun this after any change to the kernel's pipeline.

    python scripts/sm90_protocol_check.py [LAUNCHES]
"""
import random
import sys


class MBarrier:
    def __init__(self, count):
        self.count, self.arrived, self.tx, self.phase = count, 0, 0, 0

    def _maybe_complete(self):
        if self.arrived == self.count and self.tx == 0:
            self.arrived = 0
            self.phase += 1

    def arrive(self, n=1, tx=0):
        self.arrived += n
        self.tx += tx
        assert self.arrived <= self.count, "too many arrivals in one phase"
        self._maybe_complete()

    def complete_tx(self, n):
        self.tx -= n
        assert self.tx >= 0
        self._maybe_complete()

    def done(self, parity):
        # The phase of parity `parity` has completed when the current phase has the other parity.
        return (self.phase & 1) != parity


class Named:
    def __init__(self):
        self.count, self.gen, self.members = 0, 0, set()

    def add(self, who):
        assert who not in self.members, f"{who} arrived twice in one generation"
        self.members.add(who)
        self.count += 128
        assert self.count <= 256
        if self.count == 256:
            self.count, self.members, self.gen = 0, set(), self.gen + 1


class Sim:
    """One thread block `block` of a grid of `grid`; items[i] is the number
    of key tiles of work item i."""

    def __init__(self, stages, consumers, q_buffers, store_o, chain, overlap, items, block, grid, splits, rng):
        self.S, self.C, self.QB, self.chain, self.rng = stages, consumers, q_buffers, chain, rng
        self.overlap = overlap  # kOverlap: a step's P V is waited for at the next step's start
        # kStoreO; its O goes through the Q buffer only for the output itself
        # (no split keys: partial results are written directly).
        self.store_o, self.o_through_q = store_o, store_o and splits == 1
        q_arrivals = consumers if store_o else 128 * consumers
        self.q_full = [MBarrier(1) for _ in range(q_buffers)]
        self.q_empty = [MBarrier(q_arrivals) for _ in range(q_buffers)]
        self.k_full = [MBarrier(1) for _ in range(stages)]
        self.v_full = [MBarrier(1) for _ in range(stages)]
        self.k_empty = [MBarrier(128 * consumers) for _ in range(stages)]
        self.v_empty = [MBarrier(128 * consumers) for _ in range(stages)]
        self.named = {1: Named(), 2: Named()}
        self.smem = {}          # region -> tag
        self.pending = []       # (region, tag, barrier)
        self.stores = []        # (region, tag, reader): TMA stores not yet done reading
        self.reading = {}       # region -> set of readers
        self.all_items = items
        self.grid = grid
        self.my_items = list(range(block, len(items), grid))

    def tma(self, region, tag, bar):
        self.pending.append((region, tag, bar))

    def tma_step(self):
        i = self.rng.randrange(len(self.pending) + len(self.stores))
        if i >= len(self.pending):
            region, tag, reader = self.stores.pop(i - len(self.pending))
            assert self.smem.get(region) == tag, f"{reader} stores {region}: has {self.smem.get(region)}, wants {tag}"
            self.end_read(reader, region)
            return
        region, tag, bar = self.pending.pop(i)
        assert not self.reading.get(region), f"copy into {region} while read by {self.reading[region]}"
        self.smem[region] = tag
        bar.complete_tx(1)

    def write(self, who, region, old_tag, new_tag):
        """A warpgroup's own writes into shared memory (O into its rows of the Q buffer)."""
        assert self.smem.get(region) == old_tag, f"{who} overwrites {region}: has {self.smem.get(region)}"
        assert not any(r == region for r, _, _ in self.pending), f"{who} writes {region} with a copy pending"
        assert not self.reading.get(region), f"{who} writes {region} while read by {self.reading[region]}"
        self.smem[region] = new_tag

    def begin_read(self, who, region, tag):
        assert self.smem.get(region) == tag, f"{who} reads {region}: has {self.smem.get(region)}, wants {tag}"
        assert not any(r == region for r, _, _ in self.pending), f"{who} reads {region} with a copy pending"
        self.reading.setdefault(region, set()).add(who)

    def end_read(self, who, region):
        self.reading[region].discard(who)

    # Generators yield a predicate: the actor runs on when it is true.
    def producer(self):
        S, QB = self.S, self.QB
        tile_count = item_count = 0
        for item in self.my_items:
            n_tiles = self.all_items[item]
            qb, q_round = item_count % QB, item_count // QB
            if q_round > 0:
                par = (q_round - 1) & 1
                yield lambda qb=qb, par=par: self.q_empty[qb].done(par)
            self.q_full[qb].arrive(1, tx=2 * self.C)
            for _half in range(2):
                for wg in range(self.C):  # each consumer's rows of the box
                    self.tma(("q", qb, wg), (item, "q"), self.q_full[qb])
            for j in range(n_tiles):
                s, rnd = tile_count % S, tile_count // S
                if rnd > 0:
                    par = (rnd - 1) & 1
                    yield lambda s=s, par=par: self.k_empty[s].done(par)
                self.k_full[s].arrive(1, tx=2)
                self.tma(("k", s), (item, j), self.k_full[s])
                self.tma(("k", s), (item, j), self.k_full[s])
                if rnd > 0:
                    par = (rnd - 1) & 1
                    yield lambda s=s, par=par: self.v_empty[s].done(par)
                self.v_full[s].arrive(1, tx=2)
                self.tma(("v", s), (item, j), self.v_full[s])
                self.tma(("v", s), (item, j), self.v_full[s])
                tile_count += 1
            item_count += 1

    def consumer(self, wg):
        S, pp = self.S, self.C == 2
        me = f"wg{wg}"

        def take_turn():
            if pp:
                bar = self.named[1 + wg]
                gen = bar.gen
                bar.add(me)
                return lambda: bar.gen > gen
            return None

        def pass_turn(j, n_tiles, last_item):
            if pp and not (wg == 1 and last_item and j == n_tiles - 1):
                self.named[2 - wg].add(me)

        store_o = self.store_o
        acc = {"item": None, "pvs": 0}  # whose P V the O accumulators hold, and how many

        def restart(item):
            acc["item"], acc["pvs"] = item, 0

        def pv(item, j, stage):
            assert acc["item"] == item, f"{me}: P V of item {item} into the accumulators of {acc['item']}"
            assert acc["pvs"] == j, f"{me}: P V of tile {j} of item {item} after {acc['pvs']}"
            acc["pvs"] += 1
            self.begin_read(me, ("v", stage), (item, j))

        def write_out(item, q, qb):
            assert acc["item"] == item and acc["pvs"] == self.all_items[item], f"{me}: item {item} written early"
            if store_o:
                # O into the warpgroup's rows of the Q buffer (or partial
                # results to global memory), then one thread's TMA store and
                # the buffer freed once the store has read it.
                if self.o_through_q:
                    self.write(me, q, (item, "q"), (item, "o"))
                    self.begin_read(f"{me}-store", q, (item, "o"))
                    self.stores.append((q, (item, "o"), f"{me}-store"))
                    yield lambda q=q: not any(r == q for r, _, _ in self.stores)
                self.q_empty[qb].arrive(1)

        if pp and wg == 1:
            self.named[1].add(me)
        tile_count = item_count = 0
        s = 0
        done = None  # (item, its Q region, its Q buffer) whose last P V is pending (chained)
        for item in self.my_items:
            n_tiles = self.all_items[item]
            last_item = item + self.grid >= len(self.all_items)
            chained = self.chain and item_count > 0
            if not chained:
                restart(item)
            qb = item_count % self.QB
            q = ("q", qb, wg)
            par = (item_count // self.QB) & 1
            yield lambda qb=qb, par=par: self.q_full[qb].done(par)
            done_stage = s
            s = tile_count % S
            par = (tile_count // S) & 1
            yield lambda s=s, par=par: self.k_full[s].done(par)
            # Chained, every item's first step has a P V: the previous item's
            # last, or for the block's first item one of zeros over its own
            # first V tile (read, but adding nothing).
            pv_stage = done_stage if chained else s
            if self.chain:
                par = (((tile_count - 1) if chained else tile_count) // S) & 1
                yield lambda st=pv_stage, par=par: self.v_full[st].done(par)
            t = take_turn()
            if t:
                yield t
            if chained:
                pv(done[0], self.all_items[done[0]] - 1, done_stage)
            elif self.chain:
                self.begin_read(me, ("v", s), (item, 0))
            self.begin_read(me, q, (item, "q"))
            self.begin_read(me, ("k", s), (item, 0))
            pass_turn(0, n_tiles, last_item)
            yield lambda: True  # the MMAs run a while
            if self.chain:
                self.end_read(me, ("v", pv_stage))
            self.end_read(me, q)
            self.end_read(me, ("k", s))
            if chained:
                self.v_empty[done_stage].arrive(128)
            self.k_empty[s].arrive(128)
            if not store_o and n_tiles == 1:
                self.q_empty[qb].arrive(128)
            if chained:
                yield from write_out(*done)
                restart(item)
            pv_in_flight = None  # overlap: the stage whose P V still runs

            def finish_pv():
                yield lambda: True  # the P V runs a while
                self.end_read(me, ("v", pv_in_flight))
                self.v_empty[pv_in_flight].arrive(128)

            for j in range(1, n_tiles):
                prev = s
                tile_count += 1
                s = tile_count % S
                if pv_in_flight is not None:
                    yield from finish_pv()
                    pv_in_flight = None
                par = (tile_count // S) & 1
                yield lambda s=s, par=par: self.k_full[s].done(par)
                par = ((tile_count - 1) // S) & 1
                yield lambda prev=prev, par=par: self.v_full[prev].done(par)
                t = take_turn()
                if t:
                    yield t
                pv(item, j - 1, prev)
                self.begin_read(me, q, (item, "q"))
                self.begin_read(me, ("k", s), (item, j))
                pass_turn(j, n_tiles, last_item)
                yield lambda: True
                if self.overlap:  # the Q K^T is done; the P V may still run
                    pv_in_flight = prev
                else:
                    self.end_read(me, ("v", prev))
                    self.v_empty[prev].arrive(128)
                self.end_read(me, q)
                self.end_read(me, ("k", s))
                self.k_empty[s].arrive(128)
                if not store_o and j == n_tiles - 1:
                    self.q_empty[qb].arrive(128)
            if pv_in_flight is not None:
                yield from finish_pv()
            tile_count += 1
            item_count += 1
            if self.chain and not last_item:
                done = (item, q, qb)  # the last P V goes with the next item's first Q K^T
                continue
            par = ((tile_count - 1) // S) & 1
            yield lambda s=s, par=par: self.v_full[s].done(par)
            pv(item, n_tiles - 1, s)
            yield lambda: True
            self.end_read(me, ("v", s))
            self.v_empty[s].arrive(128)
            yield from write_out(item, q, qb)
        self.finished.add(me)

    def run(self):
        self.finished = set()
        actors = {"producer": self.producer()}
        for wg in range(self.C):
            actors[f"wg{wg}"] = self.consumer(wg)
        waits = {name: (lambda: True) for name in actors}
        while actors or self.pending or self.stores:
            runnable = [n for n in actors if waits[n]()]
            choices = runnable + (["tma"] if self.pending or self.stores else [])
            if not choices:
                raise AssertionError(f"deadlock: blocked {sorted(actors)}")
            pick = self.rng.choice(choices)
            if pick == "tma":
                self.tma_step()
                continue
            try:
                waits[pick] = next(actors[pick])
            except StopIteration:
                del actors[pick]
        assert self.finished == {f"wg{w}" for w in range(self.C)}
        for name, bar in self.named.items():
            assert bar.count == 0, f"named barrier {name} left with {bar.count}"


def items_of(all_tiles, per, n_x):
    """Key tiles of each item, as the kernel's item_at splits them."""
    splits = -(-all_tiles // per)
    return [min(per, all_tiles - (item // n_x) * per) for item in range(n_x * splits)]


def main(trials):
    rng = random.Random(0)
    runs = 0
    for _ in range(trials):
        # (stages, consumers, Q buffers, O through the Q buffer, chained
        # items, overlapped P V): the kernel's shapes and pipelines, and a
        # few it does not use.
        stages, consumers, q_buffers, store_o, chain, overlap = rng.choice([
            (2, 2, 1, False, False, False), (3, 1, 1, False, False, False), (2, 2, 2, False, False, False),
            (2, 2, 2, True, False, False), (3, 2, 1, False, False, False), (2, 2, 2, False, True, False),
            (2, 2, 2, True, True, False), (2, 2, 1, False, False, True), (2, 2, 2, True, False, True),
            (2, 1, 1, False, False, False), (2, 1, 2, True, False, False), (3, 1, 2, False, True, False),
            (3, 2, 1, False, False, True), (2, 1, 1, False, False, True)])
        all_tiles = rng.randint(1, 9)
        num_splits = rng.randint(1, all_tiles)
        per = -(-all_tiles // num_splits)
        n_x = rng.randint(1, 5)
        items = items_of(all_tiles, per, n_x)
        assert all(n >= 1 for n in items)
        grid = rng.randint(1, len(items))  # persistent blocks loop when smaller
        splits = len(items) // n_x
        for block in range(grid):
            Sim(stages, consumers, q_buffers, store_o, chain, overlap, items, block, grid, splits, rng).run()
            runs += 1
    print(f"ok: {runs} block runs over {trials} launches")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
