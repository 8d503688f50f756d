"""A model check of the barrier protocol of csrc/cuda/attention_sm90.cu.

The kernel's producer thread, its consumer warpgroups and the TMA unit are
run as actors under random interleavings, for random launches (stages,
consumers, key tiles, splits, query tiles, grid size), with the semantics of
mbarriers (arrival counts, transaction bytes, phase parity) and of named
barriers (bar.sync / bar.arrive of 128 threads each). It checks that no
launch deadlocks, that every MMA reads the Q, K or V tile it means to, that
no copy lands in a stage while an MMA reads it, and that no named barrier is
left half-arrived. Its control flow is a transcription of the kernel's: change
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

    def __init__(self, stages, consumers, items, block, grid, rng):
        self.S, self.C, self.rng = stages, consumers, rng
        self.q_full, self.q_empty = MBarrier(1), MBarrier(128 * consumers)
        self.k_full = [MBarrier(1) for _ in range(stages)]
        self.v_full = [MBarrier(1) for _ in range(stages)]
        self.k_empty = [MBarrier(128 * consumers) for _ in range(stages)]
        self.v_empty = [MBarrier(128 * consumers) for _ in range(stages)]
        self.named = {1: Named(), 2: Named()}
        self.smem = {}          # region -> tag
        self.pending = []       # (region, tag, barrier)
        self.reading = {}       # region -> set of readers
        self.all_items = items
        self.grid = grid
        self.my_items = list(range(block, len(items), grid))

    def tma(self, region, tag, bar):
        self.pending.append((region, tag, bar))

    def tma_step(self):
        i = self.rng.randrange(len(self.pending))
        region, tag, bar = self.pending.pop(i)
        assert not self.reading.get(region), f"copy into {region} while read by {self.reading[region]}"
        self.smem[region] = tag
        bar.complete_tx(1)

    def begin_read(self, who, region, tag):
        assert self.smem.get(region) == tag, f"{who} reads {region}: has {self.smem.get(region)}, wants {tag}"
        assert not any(r == region for r, _, _ in self.pending), f"{who} reads {region} with a copy pending"
        self.reading.setdefault(region, set()).add(who)

    def end_read(self, who, region):
        self.reading[region].discard(who)

    # Generators yield a predicate: the actor runs on when it is true.
    def producer(self):
        S = self.S
        tile_count = item_count = 0
        for item in self.my_items:
            n_tiles = self.all_items[item]
            if item_count > 0:
                par = (item_count - 1) & 1
                yield lambda: self.q_empty.done(par)
            self.q_full.arrive(1, tx=2)
            self.tma("q", (item, "q"), self.q_full)
            self.tma("q", (item, "q"), self.q_full)
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

        if pp and wg == 1:
            self.named[1].add(me)
        tile_count = item_count = 0
        for item in self.my_items:
            n_tiles = self.all_items[item]
            last_item = item + self.grid >= len(self.all_items)
            par = item_count & 1
            yield lambda: self.q_full.done(par)
            s = tile_count % S
            par = (tile_count // S) & 1
            yield lambda s=s, par=par: self.k_full[s].done(par)
            t = take_turn()
            if t:
                yield t
            self.begin_read(me, "q", (item, "q"))
            self.begin_read(me, ("k", s), (item, 0))
            pass_turn(0, n_tiles, last_item)
            yield lambda: True  # the MMAs run a while
            self.end_read(me, "q")
            self.end_read(me, ("k", s))
            self.k_empty[s].arrive(128)
            if n_tiles == 1:
                self.q_empty.arrive(128)
            for j in range(1, n_tiles):
                prev = s
                tile_count += 1
                s = tile_count % S
                par = (tile_count // S) & 1
                yield lambda s=s, par=par: self.k_full[s].done(par)
                par = ((tile_count - 1) // S) & 1
                yield lambda prev=prev, par=par: self.v_full[prev].done(par)
                t = take_turn()
                if t:
                    yield t
                self.begin_read(me, ("v", prev), (item, j - 1))
                self.begin_read(me, "q", (item, "q"))
                self.begin_read(me, ("k", s), (item, j))
                pass_turn(j, n_tiles, last_item)
                yield lambda: True
                self.end_read(me, ("v", prev))
                self.end_read(me, "q")
                self.end_read(me, ("k", s))
                self.v_empty[prev].arrive(128)
                self.k_empty[s].arrive(128)
                if j == n_tiles - 1:
                    self.q_empty.arrive(128)
            par = (tile_count // S) & 1
            yield lambda s=s, par=par: self.v_full[s].done(par)
            self.begin_read(me, ("v", s), (item, n_tiles - 1))
            yield lambda: True
            self.end_read(me, ("v", s))
            self.v_empty[s].arrive(128)
            tile_count += 1
            item_count += 1
        self.finished.add(me)

    def run(self):
        self.finished = set()
        actors = {"producer": self.producer()}
        for wg in range(self.C):
            actors[f"wg{wg}"] = self.consumer(wg)
        waits = {name: (lambda: True) for name in actors}
        while actors or self.pending:
            runnable = [n for n in actors if waits[n]()]
            choices = runnable + (["tma"] if self.pending else [])
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
        stages, consumers = rng.choice([(2, 2), (3, 1), (2, 1), (3, 2)])
        all_tiles = rng.randint(1, 9)
        num_splits = rng.randint(1, all_tiles)
        per = -(-all_tiles // num_splits)
        n_x = rng.randint(1, 5)
        items = items_of(all_tiles, per, n_x)
        assert all(n >= 1 for n in items)
        grid = rng.randint(1, len(items))  # persistent blocks loop when smaller
        for block in range(grid):
            Sim(stages, consumers, items, block, grid, rng).run()
            runs += 1
    print(f"ok: {runs} block runs over {trials} launches")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
