"""Replay small graphs from CUDA graphs captured by the backend.

Why: at batch 1 the early scales of a VAR sampler are launch-bound: a block of Infinity-2B
issues tens of kernels per scale whose GPU time is shorter than the host time to launch
them. Inductor's own CUDA graphs ("reduce-overhead") do not fit these samplers: the K/V
cache grows by ``torch.cat`` into tensors the next scale reads after other graphs ran, which
cudagraph trees treat as overwritten outputs. Here every (input shapes, parameter addresses)
pair gets its own graph with a private memory pool, the per-call inputs are copied into
static buffers, and the outputs are cloned out after the replay, so callers see ordinary
tensors with ordinary lifetimes, or, with ``cuda_graph_lend_outputs``, lent from memory no
graph writes while the caller holds them (``CudaGraphCache._lending``). The graphs of one session
share one memory pool (``SharedPool``) unless the option ``cuda_graph_pool: private`` asks for one
pool per graph; graphs lending in place capture into their group's pool (``_Group``) or their own.
Only calls whose per-call inputs are small are captured
(``max_bytes``): for large scales the copies would cost more than the launches they save,
and those scales are GPU-bound anyway.

Preconditions: the wrapped function is pure apart from its outputs (no in-place update of an
input, see ``mutates_inputs``), issues no host synchronisation, and reads parameters
(``static`` inputs) that are not reallocated between calls (their address is part of the
key, so a reallocated parameter gets a new graph, never stale memory).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import operator
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx

from ..passes.graph_utils import writes_into

log = logging.getLogger("toprovar")


def mutates_inputs(graph: fx.Graph) -> bool:
    """Whether an in-place op (``add_``, ``copy_``, ``x[i] = v``) writes into a graph input or a view of one."""
    return writes_into(graph, set(graph.find_nodes(op="placeholder")))


class StaticInput:
    """A static input buffer of captured graphs, and what was last copied into it.

    Why: most per-call inputs of a VAR block are the same tensors for every block of a
    generation (RoPE table, text K/V, conditioning); copying them again before each replay
    costs a launch and a copy per input (on the H200, ``aten::copy_`` was the top host op:
    4,729 calls per generation). A copy is skipped when the buffer still holds a copy of the
    same tensor object at the same version. Sound because only ``refresh`` writes into the
    buffer (captured graphs never write into their inputs, ``mutates_inputs``), and any in-place
    write into the source bumps its version counter. Inference-mode tensors have no version
    counter, so they are always copied.
    """

    __slots__ = ("tensor", "_source", "_version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        # weakref of the tensor last copied in; None after a copy from an inference tensor (no
        # version counter), so ``fresh`` never trusts one
        self._source: Any = None
        self._version = -1

    def forget(self) -> None:
        """The buffer's values are unknown (after a capture: outputs that alias an input hold
        whatever the capture left there); the next ``refresh`` copies."""
        self._source = None

    def fresh(self, src: torch.Tensor) -> bool:
        """Whether the buffer already holds ``src``'s values (``refresh`` would not copy)."""
        ref = self._source
        return ref is not None and ref() is src and src._version == self._version

    def refresh(self, src: torch.Tensor) -> bool:
        """Make the buffer hold ``src``'s values; returns whether a copy was needed."""
        if self.fresh(src):
            return False
        self.tensor.copy_(src)
        if src.is_inference():
            self._source = None
        else:
            self._source, self._version = weakref.ref(src), src._version
        return True


# dtypes every cuBLAS GEMM path takes (a float8 input would fail the primer's addmm)
_GEMM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _blas_workspace_clearer(api: Any) -> Callable[[], None] | None:
    """The function that drops the BLAS library's cached workspaces, or None where there is none."""
    if api is torch.cuda:
        return getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    return getattr(api, "clear_blas_workspaces", None)  # a stand-in API


@contextlib.contextmanager
def _blas_workspace(api: Any, shared: SharedPool | None, own_pool: bool, like: torch.Tensor) -> Iterator[None]:
    """Capture with a cuBLAS workspace that lives in a pool our graphs keep alive.

    Why: cuBLAS caches one workspace per (handle, stream), and a captured GEMM embeds its
    address. Others drop that cache: Inductor's CUDA-graph trees clear every workspace around each
    recording, and in torch 2.11 destroying any CUDA graph clears the workspaces of its capture
    stream (pytorch/pytorch#193402). A workspace from the default pool then goes back to general
    use (or to the driver) while our graphs still write into it: on the H200 (torch 2.11) our first
    replay after a ``mode="reduce-overhead"`` compile in the same process segfaulted.

    So the cache is cleared before a capture, and the capture's first GEMM allocates the workspace
    inside a pool of ours. Dropped by anyone later, it returns to that pool, which no allocation
    outside our captures reaches and which lives as long as a graph captured into it:
    * graphs of the session's shared pool allocate it there (and leave it cached, so a later
      private capture would find it);
    * a graph lending in place from a pool other than the shared one (``own_pool``: its own or its
      group's) takes it from the shared pool too: ``SharedPool.prime_blas_workspace`` allocates it
      there first. Allocated in each own pool it cost one workspace per such graph (+5.7 GiB of
      pools on Infinity-2B at batch 1, H200);
    * without a shared pool (option ``cuda_graph_pool: private``) each graph allocates its own
      and the cache is cleared again after the capture, leaving the block to that graph's pool.
    Sharing one workspace is safe for the same reason sharing intermediates is (``SharedPool``):
    replays are sequential on one stream, and a GEMM's workspace holds nothing between kernels.
    """
    clear = _blas_workspace_clearer(api)
    if clear is None:
        yield
        return
    sync = getattr(api, "synchronize", None)
    if sync is not None:
        sync()  # a workspace still used by queued kernels (the warm-up's) is not handed back early
    if shared is None:
        clear()
        try:
            yield
        finally:
            clear()
        return
    if own_pool:
        shared.prime_blas_workspace(api, clear, like)
    else:
        clear()
    yield


def _use_count(t: torch.Tensor) -> int:
    """References to ``t``'s storage (tensors and views sharing it), plus one for the lookup."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _storage_use_count(storage: torch.UntypedStorage) -> int:
    """References to ``storage`` (tensors and views sharing it, and ``storage`` itself)."""
    return torch._C._storage_Use_Count(storage._cdata)


class _Captured:
    """One CUDA graph: static input buffers, the graph, its static outputs.

    ``lent``: indices of outputs handed out as aliases of the static output instead of clones
    (option ``cuda_graph_lend_outputs``). Before a replay, every lent output's storage must be
    back to the references it had right after the capture (nobody holds an alias or a view),
    and every borrowed input (``borrowed``: position -> address of another graph's lent output
    the graph was captured on) must be at that address, and in a group (``pooled``: lent outputs
    in its group's pool), no later member's pooled output may be held (``_Group``); otherwise
    ``run`` returns ``BUSY`` and the call runs without the graph, so a replay never overwrites
    what a caller still holds.
    """

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[Any], buffers: dict[int, StaticInput],
                 outputs: Any, lent: frozenset[int] = frozenset(), borrowed: dict[int, int] | None = None,
                 pooled: frozenset[int] = frozenset()):
        self.graph = graph
        self.inputs = inputs  # what the graph was captured with: buffers' tensors and static inputs
        self.buffers = buffers  # argument position -> its static buffer
        self.outputs = outputs
        self.copies = 0  # copies made before replays (skipped ones not counted)
        self.borrowed = borrowed or {}
        self._flat = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        self._sequence = type(outputs) if isinstance(outputs, (tuple, list)) else None
        # per output, how it is handed out: 0 as is (not a tensor), 1 an alias (lent), 2 a clone
        self._hand = tuple(0 if not isinstance(o, torch.Tensor) else 1 if i in lent else 2
                           for i, o in enumerate(self._flat))
        self._all_lent = all(h == 1 for h in self._hand)  # the usual case: aliases made in one C loop
        self._buffer_items = tuple(buffers.items())
        # lent output position -> its storage (held here, so the references counted include this one)
        self._storages = {i: self._flat[i].untyped_storage() for i in lent}
        # lent output position -> the references to its storage while nobody outside holds it
        self.watch = {i: _storage_use_count(st) for i, st in self._storages.items()}
        # lent outputs in a group's pool (``_Group``), whose memory an earlier member's replay may write
        self.pooled = pooled
        self.group: _Group | None = None  # set by ``_Group.join``, with the graph's rank in it
        self.rank = 0
        self._checks()
        self.busy = 0  # calls that ran without the graph because a lent output was still held
        self.own_pool_bytes = 0  # memory reserved by the graph's own pool (lending in place), else 0
        # addresses of this call's borrowed inputs -> the graph captured on those lenders (None: not
        # capturable); see ``CudaGraphCache._run_moved``
        self.siblings: dict[tuple[int, ...], _Captured | None] = {}

    def expect_held(self, position: int, extra: int) -> None:
        """``extra`` more references to output ``position``'s storage are held for good (by a
        capture); outputs that are views of one storage (K and V split from one projection) share
        the count."""
        held = self._storages[position]._cdata
        for i, st in self._storages.items():
            if st._cdata == held:
                self.watch[i] += max(extra, 0)
        self._checks()

    def _checks(self) -> None:
        """``watch`` and ``borrowed`` as the flat pairs ``_blocked`` loops over, and the pooled
        outputs' pairs the group's earlier members check (``victim_pairs``); outputs that share a
        storage (K and V split from one projection) share their count, so it is checked once."""
        # storage handles stay valid while ``_storages`` holds the storages
        self._watch_pairs = tuple({self._storages[i]._cdata: base for i, base in self.watch.items()}.items())
        self.victim_pairs = tuple({self._storages[i]._cdata: self.watch[i] for i in self.pooled}.items())
        self._borrowed_pairs = tuple(self.borrowed.items())
        self._checked = bool(self._watch_pairs or self._borrowed_pairs)
        if self.group is not None:
            self.group.free_from = len(self.group.members)  # counts changed: nothing known free

    def _blocked(self, args: Sequence[Any]) -> bool:
        # plain loops over C calls: this runs before every replay of a launch-bound scale
        use_count = torch._C._storage_Use_Count
        for cdata, base in self._watch_pairs:
            if use_count(cdata) != base:
                return True
        for i, ptr in self._borrowed_pairs:  # noqa: SIM110 - any() over a generator costs more here
            if args[i].data_ptr() != ptr:
                return True
        group = self.group
        if group is not None and group.free_from > self.rank + 1:
            return group.held_after(self.rank)
        return False

    def run(self, args: Sequence[Any]) -> Any:
        # this runs for every call of a launch-bound scale: method calls only where work is done
        if self._checked and self._blocked(args):  # only with lent outputs or borrowed inputs
            self.busy += 1
            return BUSY
        for i, buf in self._buffer_items:
            src = args[i]
            ref = buf._source
            if ref is None or ref() is not src or src._version != buf._version:  # ``StaticInput.fresh``
                self.copies += buf.refresh(src)
        self.graph.replay()
        if self.group is not None:
            self.group.free_from = self.rank + 1  # its outputs are out; the later members' stay free
        if self._all_lent:
            outs = list(map(_detach, self._flat))
        else:
            outs = [o if h == 0 else o.detach() if h == 1 else o.clone() for o, h in zip(self._flat, self._hand)]
        return outs[0] if self._sequence is None else self._sequence(outs)


# a graph whose lendable outputs total this much lends them in place from a private pool (see _lending)
PRIVATE_LEND_MIN_BYTES = 16 << 20
# A graph that could not replay this many calls (a lent output still held, or a borrowed input
# elsewhere) is captured again without lending or borrowing: whatever holds its outputs, it then
# costs copies and clones instead of running without a graph for good. Counted in total, not in a
# row: a caller that keeps the previous output during the next call blocks every other call.
BUSY_LIMIT = 3
# Graphs captured again per graph on other lenders' outputs (``CudaGraphCache._run_moved``): one
# per text length a session has seen upstream, on Infinity; past it, calls count as busy.
MAX_SIBLINGS = 8
BUSY = object()  # _Captured.run: the graph cannot replay now; run the call without it


_UNSEEN = object()
_data_ptr = torch.Tensor.data_ptr
_detach = torch.Tensor.detach


_CLONE_CHANGES: dict[tuple[Any, ...], bool] = {}  # (shape, strides) -> _clone_changes_layout


def _clone_changes_layout(t: torch.Tensor) -> bool:
    """Whether ``t.clone()`` has other strides than ``t`` (a view that is not dense, such as K of
    a fused QKV projection): a replay hands such an output as a clone (a clone, a home laid out as
    one, or an output lent in place only when its strides are a clone's). Memoised per layout: a
    meta tensor per output would cost more host time than the call it follows at early scales."""
    key = (t.shape, t.stride())
    changes = _CLONE_CHANGES.get(key)
    if changes is None:
        if len(_CLONE_CHANGES) >= 4096:
            _CLONE_CHANGES.clear()
        changes = _CLONE_CHANGES[key] = torch.empty_like(t, device="meta").stride() != t.stride()
    return changes


def _as_replayed(out: Any) -> Any:
    """The outputs of a call that has, or will have, a graph but ran without it (its capture
    refused for memory, the graph busy, or rerun after ``SharedPool.relieve``), laid out as a
    replay hands them: outputs whose clone has other strides are cloned.

    Why: Dynamo guards the strides of the tensors the sampler passes on (a block's K/V cache is
    the next scale's input), and its frames were compiled on replayed outputs. Handed on as the
    direct call left them, they made every block frame compile again after a relief (CPU stand-in:
    3.1 s on infinity-tiny; H200, Infinity-8B: 4.2 s against 0.56 s, ``gpu_check.py --refused``),
    each new entry counting against Dynamo's recompile limit."""
    if isinstance(out, torch.Tensor):
        return out.clone() if _clone_changes_layout(out) else out
    if isinstance(out, (tuple, list)) and type(out) in (tuple, list):
        return type(out)(o.clone() if isinstance(o, torch.Tensor) and _clone_changes_layout(o) else o for o in out)
    return out


def _getter(positions: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``args -> tuple(args[i] for i in positions)``, in C (``operator.itemgetter``) where it can."""
    if len(positions) >= 2:
        return operator.itemgetter(*positions)
    if len(positions) == 1:
        only = positions[0]
        return lambda args: (args[only],)
    return lambda args: ()


def _workspace_like(inputs: Sequence[Any], device_type: str) -> torch.Tensor:
    """An empty tensor on the device and in the dtype of the first input a GEMM could take (the
    cuBLAS workspace primer's). A new tensor, not one of ``inputs``: an alias of a borrowed input
    still alive when ``_capture`` counts the references the capture keeps would make the lender
    expect one more than it sees once ``_capture`` returns, so it never replayed until captured
    again without lending (``BUSY_LIMIT``). With replays that keep no reference (as on a GPU), the
    zoo sampler's last code map, running sum of codes and decoder did so; on the H200 three graphs
    ran without replay in the first rounds of every e2e run."""
    for a in inputs:
        if isinstance(a, torch.Tensor) and a.dtype in _GEMM_DTYPES:
            return torch.empty(0, device=a.device, dtype=a.dtype)
    return torch.empty(0, device=device_type)


def _empty_like_layout(like: torch.Tensor) -> StaticInput:
    return StaticInput(torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device))


def _copying_into(fn: Callable, homes: dict[int, torch.Tensor]) -> Callable:
    """``fn`` whose outputs at ``homes``' positions are copied into them and returned from there."""
    if not homes:
        return fn

    def fn_into_homes(*args: Any) -> Any:
        outs = fn(*args)
        flat = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        # One copy node per output, GPU time the baseline does not spend: until every other output
        # was lent in place (``_lending``) four per block graph on Infinity-2B, 3.4 ms per generation
        # (docs/backend.md, tenth session). ``torch._foreach_copy_`` made no difference on the H200:
        # it falls back to one copy per tensor for mixed dtypes and non-dense views.
        for i, home in homes.items():
            home.copy_(flat[i])
            flat[i] = home
        return type(outs)(flat) if isinstance(outs, (tuple, list)) else flat[0]

    fn_into_homes.homes = homes  # what the captured graph writes outside its pool (a stand-in API reads it)
    return fn_into_homes


class _Group:
    """Graphs that lend their outputs in place from one memory pool: those with the same input
    layouts captured during one scale of one generation (``SharedPool.position``), such as the
    block graphs of one dense scale (``CudaGraphCache._lending``).

    Why it is safe: memory one member's capture freed (its intermediates) may back the outputs of
    a member captured later, which the earlier member's replay then overwrites. So a member
    replays only while no later member's pooled output is held (``held_after``); outputs of
    earlier members never lie in its intermediates (they were alive during its capture). Why it
    passes: in a sampler the blocks of a scale run in the same order every generation, and their
    outputs are let go before the same block runs again (the hidden state by the next block, the
    K/V cache by the next scale, the entropies at the next generation's first tick). Why by
    position: graphs captured later (a generation's first block, which runs before the clock
    ticks and so is captured in the next generation when lending starts; a block planned only
    from some generation on) would join a group whose members run after them.

    ``members`` keeps every graph captured into the pool, also one captured again without lending
    (what a caller holds of it still lies in the pool), and so the pool alive: a capture into a
    pool whose graphs were all destroyed fails (``SharedPool.start_lending``).

    ``free_from``: the members from this rank on are known to be free (their pooled outputs held
    by nobody outside). A member's outputs are held again only after it replays, which sets it to
    the rank after that member; so in order, only a scale's first replay checks the later members'
    reference counts, and each next one checks none (at 32 blocks, 124 counts per block call
    otherwise, about 4 us of host time per call on a CPU host).
    """

    __slots__ = ("key", "handle", "members", "free_from")

    def __init__(self, key: tuple[Any, ...], handle: Any) -> None:
        self.key = key
        self.handle = handle
        self.members: list[_Captured] = []
        self.free_from = 0

    def join(self, captured: _Captured) -> None:
        captured.group, captured.rank = self, len(self.members)
        self.members.append(captured)
        self.free_from = len(self.members)

    def held_after(self, rank: int) -> bool:
        """Whether a pooled output of a member after ``rank`` is held (if not, all are free now)."""
        use_count = torch._C._storage_Use_Count
        for member in self.members[rank + 1:self.free_from]:
            # read now: a member's counts grow when a capture borrows its outputs (``expect_held``)
            for cdata, base in member.victim_pairs:
                if use_count(cdata) != base:
                    return True
        self.free_from = rank + 1
        return False


def _available(api: Any) -> tuple[int, int] | None:
    """(bytes free for new allocations: free on the device plus what the caching allocator holds
    unused, the device's total), or None for a stand-in API without ``mem_get_info``."""
    info = getattr(api, "mem_get_info", None)
    if info is None:
        return None
    try:
        free, total = info()
        return free + _cached_unused(api), total
    except (RuntimeError, AttributeError):
        return None


def _cached_unused(api: Any) -> int:
    """Bytes the caching allocator reserves but does not use, from one allocator query where the
    API has ``memory_stats_as_nested_dict`` (torch.cuda), else from ``memory_reserved`` and
    ``memory_allocated``.

    Why: ``torch.cuda.memory_reserved`` and ``memory_allocated`` each flatten and sort every
    allocator statistic in Python (``torch.cuda.memory_stats``), about 0.25 ms a call on the
    H200; asked before every refused capture, the pair cost 0.6 s per Infinity-8B generation
    (``benchmarks/results/gpu-check-2026-12-01-refused.md``)."""
    nested = getattr(api, "memory_stats_as_nested_dict", None)
    if nested is None:
        return api.memory_reserved() - api.memory_allocated()
    stats = nested()
    return stats["reserved_bytes"]["all"]["current"] - stats["allocated_bytes"]["all"]["current"]


def default_min_free(total: int) -> int:
    """The free-memory floor when option ``cuda_graph_min_free_mib`` is not given: 1/32 of the device."""
    return total // 32


def _reserved(api: Any) -> int:
    """Bytes the caching allocator reserves (0 for a stand-in API without the count)."""
    reserved = getattr(api, "memory_reserved", None)
    return reserved() if reserved is not None else 0


class SharedPool:
    """One CUDA-graph memory pool for every graph a session captures.

    Why sharing is safe here: a captured graph's memory that outlives its replay is its static
    inputs (allocated outside the capture, so outside the pool) and its static outputs, which
    ``_Captured.run`` clones before any other graph runs, or, when lent, which live outside this
    pool (homes, a graph's own pool or its group's: ``CudaGraphCache._lending``). Intermediates
    freed at the end of one capture may back a later graph's intermediates or outputs; replays
    are sequential on the capturing stream, so no replay overwrites memory another graph still
    needs. What it saves:
    the intermediates of every capture stay reserved in a private pool; shared, one capture's
    freed intermediates back the next one's.

    The static input buffers are shared too (``input_buffer``): graphs whose per-call input at
    the same position has the same shape, stride and dtype (the blocks of one scale: same
    hidden-state and K/V shapes, different parameters) copy into one buffer. Safe for the same
    reason: ``_Captured.run`` copies a call's inputs in right before its replay and reads the
    outputs right after, so no other graph runs in between. Static outputs stay per graph
    (benchmarks/results/e2e.md, "Memory").
    """

    def __init__(self, lending: bool = False, private_budget: int | None = None,
                 position: Callable[[], Any] | None = None, min_free: int | None = None,
                 rows: Callable[[], int] | None = None) -> None:
        self.handle: Any = None
        # bytes of device memory a new capture must leave free (None: resolved from the device at
        # the first capture, ``room``); calls refused for it so far
        self.min_free = min_free
        self.refused = 0
        # the position (``position``) of the last refusal: later captures there are refused without
        # asking the device again, until graphs are dropped (each query costs host time, and a
        # generation refused once is refused for all its blocks: 615 queries on Infinity-8B)
        self.refused_at: Any = None
        # the rows (batch x CFG) of the running generation, and the higher floors that generations
        # of that many rows keep free since the GPU ran out of memory during one of them (``relieve``)
        self.rows = rows or (lambda: 0)
        self.floors: dict[int, int] = {}
        # where the caller is (the session's generation and scale), read at each capture: graphs
        # lending in place are grouped by it (``_Group``)
        self.position = position or (lambda: None)
        self.buffers: dict[tuple[Any, ...], StaticInput] = {}
        # address -> (layout, owning graph, output position) of every lent static output (option
        # cuda_graph_lend_outputs): a later capture that gets such a tensor as input reads it in
        # place instead of copying it
        self.lent: dict[int, tuple[Any, ...]] = {}
        # Captures lend only once lending started (``start_lending``): outputs lent while Dynamo
        # still compiles stay referenced by its example values and block their graphs for good.
        self.lending = lending
        self.caches: weakref.WeakSet[CudaGraphCache] = weakref.WeakSet()  # caches capturing into the pool
        self.replays = 0  # calls replayed by the pool's graphs
        self.reliefs = 0  # times every graph was dropped after the GPU ran out of memory (``relieve``)
        self.captures = 0  # graphs captured into the pool's session (kept ones; benchmarks wait for it to stay put)
        # per graph name: calls that had a graph but ran without it (a lent output still held)
        self.busy_by: dict[str, int] = {}
        # bytes the own pools of graphs lending in place may reserve in all (None: resolved from the
        # device at the first such capture, ``private_room``), and what they reserved so far
        self.private_budget = private_budget
        self.private_bytes = 0
        self.primer: Any = None  # the graph that allocated the cached cuBLAS workspace in this pool
        self.keeper: Any = None  # the pool's first primer, kept while the pool lives
        # per input layout, the graphs lending in place from that group's pool (``_Group``)
        self.groups: dict[tuple[Any, ...], _Group] = {}

    def private_room(self, api: Any) -> bool:
        """Whether one more graph may lend in place from a pool of its own (``CudaGraphCache._lending``).

        Why a budget: such a pool keeps the graph's intermediates reserved for it, so the memory
        grows with the number of large graphs and with the batch. On Infinity-2B at batch 1 they
        reserve about 3 GiB more than cloning (22.1 against 18.9 GiB reserved on the H200,
        ``benchmarks/results/e2e-2026-11-29-private-budget.md``), which the lending gain is worth;
        the intermediates scale with the rows, so at batch 8 it would be several times that. Past
        the budget, graphs lend through homes (one copy per output inside the graph). One graph may
        overshoot it: its size is known only after its capture."""
        if self.private_budget is None:
            try:
                total = api.get_device_properties(api.current_device()).total_memory
            except (AttributeError, RuntimeError):  # a stand-in API without devices: no budget
                total = None
            self.private_budget = -1 if total is None else total // 16
        return self.private_budget < 0 or self.private_bytes < self.private_budget

    def room(self, api: Any) -> bool:
        """Whether the device has more than ``min_free`` bytes free for a new capture: free on the
        device plus what the caching allocator holds unused (a stand-in API without
        ``mem_get_info`` always has room).

        Why: graphs are captured per shape, and prompts of another text length capture the block
        graphs again, pools included: on Infinity-2B each length added about 13 GiB
        (``benchmarks/results/e2e-2026-11-30-prompts.md``), and Infinity-8B with three lengths and
        three variants ran out of memory inside a capture (``e2e-8b-2026-11-30-prompts-oom.md``).
        Refused, a call runs without a graph (slower, never wrong) and is captured once memory is
        free again; one warning per session. Once refused at a position (the session's generation
        and scale), the device is not asked again there (``refused_at``)."""
        where = self.position()
        if where is not None and where == self.refused_at:
            self.refused += 1  # refused at this position already: memory is not freed mid-scale
            return False
        available = _available(api)
        if available is None:
            return True
        free, total = available
        if self.min_free is None:
            self.min_free = default_min_free(total)
        floor = self.floor()
        if free > floor:
            return True
        self.refused_at = where
        if not self.refused:
            log.warning("toprovar: %.0f MiB free on the GPU, not more than %.0f MiB (option cuda_graph_min_free_mib, "
                        "or raised after running out of memory): new shapes run without CUDA graphs until memory "
                        "is free again (every text length captures its own graphs; docs/backend.md)",
                        free / 2**20, floor / 2**20)
        self.refused += 1
        return False

    def floor(self) -> int:
        """The free bytes a new capture must leave: ``min_free``, or more for generations of as many
        rows as one that ran out of memory (``relieve``)."""
        return max(self.min_free or 0, self.floors.get(self.rows(), 0))

    def floors_text(self) -> str:
        """The raised floors (``relieve``) in words, for reports."""
        return ", ".join(f"{b / 2**20:.0f} MiB at {rows} rows" for rows, b in sorted(self.floors.items())) or "none raised"

    def relieve(self, api: Any, err: BaseException) -> bool:
        """After the GPU ran out of memory inside a call of ours: drop every graph of the session,
        so that the memory their pools, static outputs and input buffers hold is free for the call
        to run again without a graph, and raise the floor of generations of the running one's rows
        (batch x CFG) to what that freed. Returns whether anything was dropped (if not, the error
        is the caller's to raise).

        Why: a captured graph keeps its static outputs, input buffers and homes for as long as it
        lives (the graphs of a sampler hold, among others, a K/V cache per captured scale, where
        eager holds the latest), and the floor checked before each capture cannot know what the
        rest of the generation needs. At batch 8 on Infinity-8B (H200, twentieth session) a call
        ran out of memory where eager ran. The floor the captures leave free afterwards is what the
        graphs were holding, so the same generation fits the next time if the graphs' memory was
        what it lacked; graphs are captured again, at first sight, within it.

        Why per rows: the floor raised for every generation kept a batch-1 generation after a
        relief at batch 8 from capturing anything (8B on the H200: 98,956 MiB freed, 0 replays,
        2.9 s against 0.3 s before). A generation's memory need grows with its rows; the graphs of
        smaller ones fit beside it, as before the relief."""
        before = _reserved(api)
        dropped = self._drop_graphs()
        if not dropped:
            return False
        self.buffers.clear()
        gc.collect()  # a group and its members reference each other
        empty = getattr(api, "empty_cache", None)
        if empty is not None:
            empty()
        freed = max(before - _reserved(api), 0)
        available = _available(api)
        if self.min_free is None and available is not None:
            self.min_free = default_min_free(available[1])
        rows = self.rows()
        self.floors[rows] = max(self.floor(), freed)
        self.reliefs += 1
        (log.warning if self.reliefs == 1 else log.info)(
            "toprovar: the GPU ran out of memory (%s); dropped %d CUDA graphs (%.0f MiB freed) and ran the call "
            "without; in generations of %d rows (batch x CFG), new shapes are captured only while %.0f MiB stay "
            "free (option cuda_graph_min_free_mib; docs/backend.md)",
            str(err).split(".")[0], dropped, freed / 2**20, rows, self.floors[rows] / 2**20)
        return True

    def prime_blas_workspace(self, api: Any, clear: Callable[[], None], like: torch.Tensor) -> None:
        """Make cuBLAS's cached workspace for the capture stream a block of this pool (see
        ``_blas_workspace``): clear the cache and capture two tiny GEMMs (the cuBLAS and the
        cuBLASLt path) into the pool, on ``like``'s device and in its dtype (one the model's GEMMs
        run in, so the GPU supports it). The graph is kept: it keeps the pool, and so the block,
        alive while graphs captured afterwards embed its address. The first primer of the pool is
        kept for good (``keeper``): graphs lending in place capture elsewhere, so the shared pool
        may hold no other graph, and replacing its only graph would leave a pool whose graphs were
        all destroyed, which the next capture into it fails on (``start_lending``)."""
        self.primer = None  # its destruction may clear the cache (torch 2.11): before, not after, ours
        clear()
        a = torch.zeros(16, 16, device=like.device, dtype=like.dtype)
        bias = torch.zeros(16, device=like.device, dtype=like.dtype)
        graph = api.CUDAGraph()
        with api.graph(graph, pool=self.get(api)):
            torch.addmm(bias, a, a)
            torch.mm(a, a)
        self.primer = graph
        if self.keeper is None:
            self.keeper = graph

    def start_lending(self) -> int:
        """From now on captures lend outputs; graphs captured before are dropped so that they are
        captured again, lending. Call between generations (no output of ours in flight that a
        dropped graph would still have to produce). Returns the number of graphs dropped."""
        if self.lending:
            return 0
        self.lending = True
        return self._drop_graphs()

    def _drop_graphs(self) -> int:
        """Forget every graph of the session's caches (and what refers to them: lent outputs,
        groups, the cuBLAS primers); returns how many graphs were dropped. What a caller holds of
        their outputs stays valid. Safe between any two calls: no graph is mid-replay, and a later
        capture borrows no output of a dropped graph (``lent`` is cleared)."""
        self.lent.clear()
        self.refused_at = None  # memory is free again: ask the device
        # A new memory pool for the new captures: once every graph of a pool is destroyed, PyTorch's
        # allocator marks the pool freeable and a capture into it fails an internal assert
        # ("use_count > 0", seen on the H200 with torch 2.11); the old pool is freed with its graphs.
        self.handle = None
        self.primer = self.keeper = None
        self.groups.clear()
        self.private_bytes = 0  # the graphs' own pools go with them
        dropped = 0
        for cache in list(self.caches):
            dropped += sum(entry is not None for entry in cache.graphs.values())
            cache.graphs.clear()
        return dropped

    @property
    def busy(self) -> int:
        """Calls of the pool's graphs that ran without replay."""
        return sum(self.busy_by.values())

    def get(self, api: Any) -> Any:
        if self.handle is None:
            self.handle = api.graph_pool_handle()
        return self.handle

    def group(self, api: Any, key: tuple[Any, ...]) -> _Group:
        """The group of graphs with inputs laid out as ``key`` says (made on first use)."""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(key, api.graph_pool_handle())
        return group

    @staticmethod
    def layout(t: torch.Tensor) -> tuple[Any, ...]:
        return tuple(t.shape), t.stride(), t.dtype, t.device

    def input_buffer(self, position: int, like: torch.Tensor) -> StaticInput:
        """The shared static buffer for argument ``position`` of ``like``'s layout."""
        key = (position, *self.layout(like))
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = _empty_like_layout(like)
        return buf


def fail_one_replay(caches: Iterable[CudaGraphCache], message: str = "CUDA out of memory (injected)") -> list[str]:
    """Make the captured graph in the middle of ``caches``' graphs (in capture order) raise
    ``torch.OutOfMemoryError`` at its next replay, once; returns a list that receives the graph's
    name when it does. A fault injection for checking ``SharedPool.relieve`` on a real run
    (``benchmarks/gpu_check.py --relief``, ``tests/lowering``)."""
    entries = [(c, e) for c in caches for e in c.graphs.values() if e is not None]
    if not entries:
        raise ValueError("fail_one_replay: no captured graph to fail")
    cache, entry = entries[len(entries) // 2]
    raised: list[str] = []
    replay = entry.run

    def failing_run(args: Sequence[Any]) -> Any:
        if not raised:
            raised.append(cache.name)
            raise torch.OutOfMemoryError(message)
        return replay(args)

    entry.run = failing_run  # type: ignore[method-assign]
    return raised


class CudaGraphCache:
    """Calls ``fn``; calls with small CUDA inputs replay a captured CUDA graph instead.

    ``static[i]`` marks inputs that are module state (parameters, buffers): never copied,
    their address keys the graph. Everything else is copied into the graph's buffers each
    call. The key is cheap on purpose (addresses, shapes, strides, plain values): it is
    computed on every call of a launch-bound scale. Dtypes and devices are not in it because
    Dynamo guards them before this graph is called. A failed capture disables capturing for
    this function (with one log line) and the call runs ``fn`` as before.

    ``guarded[i]`` marks per-call tensor inputs whose sizes and strides are fixed by the caller's
    guards together with the plain (non-tensor) arguments, so they stay out of the key too: the
    tensor inputs of a Dynamo graph. Dynamo guards every static size and stride of a graph input
    (another stride recompiles, dynamic shapes or not) and passes each symbolic size or stride as
    an integer argument, which is in the key (``tests/lowering/test_lowering.py`` checks this on
    the installed torch). The shapes and strides of those inputs were two thirds of the key's
    host time (about 2.5 of 4 us per call on the CPU host).
    """

    def __init__(self, fn: Callable, static: Sequence[bool], max_bytes: int, name: str = "graph",
                 max_graphs: int = 4096, api: Any = None, device_type: str = "cuda",
                 pool: SharedPool | None = None, lend: bool = False, guarded: Sequence[bool] | None = None):
        self.fn = fn
        self.pool = pool  # None: a private pool per captured graph
        self.lend = lend and pool is not None  # lending needs the session's registry of lent outputs
        if pool is not None:
            # every cache of the pool, lending or not: ``start_lending`` drops all their graphs, or
            # one graph left in the old pool (the hoisted context's refill) keeps all of its memory
            pool.caches.add(self)
        # the CUDA graph API and the device it captures on; tests pass a stand-in to check the
        # data flow (copies in, replay, clones out) on machines without a GPU
        self.api = torch.cuda if api is None else api
        self.device_type = device_type
        self.n_args = len(static)
        self.static_idx = [i for i, s in enumerate(static) if s]
        self.dynamic_idx = [i for i, s in enumerate(static) if not s]
        self._statics_of = _getter(self.static_idx)
        guarded = [False] * len(static) if guarded is None else guarded
        if len(guarded) != len(static):
            raise ValueError(f"CudaGraphCache {name!r}: guarded has {len(guarded)} entries for {len(static)} inputs")
        self._keyed_of = _getter([i for i in self.dynamic_idx if not guarded[i]])
        self.max_bytes = max_bytes
        self.max_graphs = max_graphs
        self.name = name
        self.graphs: dict[tuple[Any, ...], _Captured | None] = {}  # None: seen, not captured
        self.disabled: str | None = None
        self.replays = 0
        self.empty = 0  # captures that recorded no kernels (not used)
        self.private = 0  # captures into a pool of their own (large outputs lent in place)

    def __call__(self, *args: Any) -> Any:
        try:
            if self.disabled is None and len(args) == self.n_args:
                key = self._key(args)
                try:
                    entry = self.graphs.get(key, _UNSEEN)
                except TypeError:  # an argument that is neither a tensor nor a plain value: never captured
                    return self.fn(*args)
                if entry is _UNSEEN:
                    entry = self._first_sight(key, args)
                    if entry is None and key not in self.graphs:  # refused for memory: captured later
                        return _as_replayed(self.fn(*args))
                if entry is not None:
                    out = entry.run(args)
                    if out is BUSY and entry.borrowed:
                        out = self._run_moved(entry, args)
                    if out is not BUSY:
                        self.replays += 1
                        if self.pool is not None:
                            self.pool.replays += 1
                        return out
                    if self.pool is not None:
                        self.pool.busy_by[self.name] = self.pool.busy_by.get(self.name, 0) + 1
                    if entry.busy >= BUSY_LIMIT and self.pool.room(self.api):
                        self._capture_without_lending(key, entry, args)
                    return _as_replayed(self.fn(*args))
            return self.fn(*args)
        except torch.OutOfMemoryError as err:
            # a capture, a replay's copies or the call itself: the graphs' memory is ours to give back
            if self.pool is None or not self.pool.relieve(self.api, err):
                raise
            return _as_replayed(self.fn(*args))

    def _key(self, args: Sequence[Any]) -> tuple[Any, ...]:
        try:  # module state is tensors: the addresses in C loops (a third of the key's host time)
            statics = tuple(map(_data_ptr, self._statics_of(args)))
        except TypeError:
            statics = tuple([args[i].data_ptr() if isinstance(args[i], torch.Tensor) else args[i]
                             for i in self.static_idx])
        dynamic = tuple([(a.shape, a.stride()) if isinstance(a, torch.Tensor) else a
                         for a in self._keyed_of(args)])
        return statics, dynamic

    def _first_sight(self, key: tuple[Any, ...], args: Sequence[Any]) -> _Captured | None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        copied = sum(args[i].numel() * args[i].element_size() for i in self.dynamic_idx
                     if isinstance(args[i], torch.Tensor))
        fits = (all(t.device.type == self.device_type for t in tensors) and copied <= self.max_bytes
                and len(self.graphs) < self.max_graphs and not self.api.is_current_stream_capturing())
        if fits and self.pool is not None and not self.pool.room(self.api):
            return None  # not remembered: captured at a later call with memory free
        entry = self._capture(args) if fits else None
        if self.disabled is None:
            self.graphs[key] = entry
        return entry

    def _run_moved(self, entry: _Captured, args: Sequence[Any]) -> Any:
        """Run a call whose borrowed inputs are other lenders' outputs than those ``entry`` was
        captured on, with the graph captured on this call's lenders (made on first sight).

        Why: the key holds shapes, not the addresses of borrowed inputs, so graphs that run the
        same shapes downstream of graphs captured per text length (Infinity's blocks, whose
        cross-attention sees the text) get the same key with each length's outputs. Without it
        every length but the first ran without replay until ``BUSY_LIMIT`` made the graph copy
        its inputs for good. Pre: ``entry.run(args)`` returned ``BUSY`` (counted in
        ``entry.busy``). Post: the call ran on a sibling graph and ``entry.busy`` is as before, or
        ``BUSY`` is returned (not moved, no sibling capturable, or the sibling is busy itself).
        """
        moved = tuple([args[i].data_ptr() for i in entry.borrowed])
        if moved == tuple(entry.borrowed.values()):
            return BUSY  # held outputs, not other lenders: the caller's busy path
        sibling = entry.siblings.get(moved, _UNSEEN)
        if sibling is _UNSEEN:
            lent = self.pool.lent
            if len(entry.siblings) >= MAX_SIBLINGS or not all(p in lent for p in moved):
                sibling = None  # not every input is a lent output: the graph would copy; wait for good
            elif not self.pool.room(self.api):
                return BUSY  # not remembered: captured at a later call with memory free
            else:
                sibling = self._capture(args)
            entry.siblings[moved] = sibling
        if sibling is None:
            return BUSY
        out = sibling.run(args)
        if out is not BUSY:
            entry.busy -= 1
        return out

    def _capture_without_lending(self, key: tuple[Any, ...], old: _Captured, args: Sequence[Any]) -> None:
        """Replace ``old`` (which keeps running without replay) by a capture that clones its
        outputs and copies its inputs. The new graph is captured while ``old`` still exists, so
        the memory pool never loses all its graphs (see ``SharedPool.start_lending``); what an
        outside holder keeps of ``old``'s outputs stays valid (its storage is referenced)."""
        log.info("toprovar: %s could not replay %d calls; captured again without lending", self.name, old.busy)
        new = self._capture(args, lend=False)
        for gone in (old, *filter(None, old.siblings.values())):
            for i in gone.watch:
                self.pool.lent.pop(gone._flat[i].data_ptr(), None)
            self.pool.private_bytes -= gone.own_pool_bytes  # its pool is freed with it
        if self.disabled is None:
            self.graphs[key] = new

    def _capture(self, args: Sequence[Any], lend: bool | None = None) -> _Captured | None:
        """Capture ``fn`` on ``args``; ``lend`` (default: whether the pool lends now) lets the graph
        lend its outputs and read lent inputs in place."""
        lend = self.lend and self.pool.lending if lend is None else lend
        inputs = list(args)
        buffers: dict[int, StaticInput] = {}
        borrowed: dict[int, int] = {}
        for i in self.dynamic_idx:
            a = args[i]
            if not isinstance(a, torch.Tensor):
                continue
            lender = self.pool.lent.get(a.data_ptr()) if lend else None
            if lender is not None and lender[0] == self.pool.layout(a):
                borrowed[i] = a.data_ptr()  # another graph's static output: read in place
                inputs[i] = a.detach()  # our own alias, to see whether the capture keeps it
                continue
            buffers[i] = self.pool.input_buffer(i, a) if self.pool is not None else _empty_like_layout(a)
            buffers[i].refresh(a)
            inputs[i] = buffers[i].tensor
        group: _Group | None = None
        try:
            # warm-up on a side stream (lazy initialisation, autotuning), as CUDA graphs require
            api = self.api
            side = api.Stream()
            side.wait_stream(api.current_stream())
            with api.stream(side):
                warm = self.fn(*inputs)
            api.current_stream().wait_stream(side)
            homes, in_place, group = self._lending(warm, inputs, lend, args)
            del warm
            # a graph lending outputs in place captures into its group's pool or into one of its
            # own (see ``_lending``)
            private = bool(in_place) and group is None
            if group is not None:
                pool = group.handle
            else:
                pool = None if self.pool is None or private else self.pool.get(api)
            fn = _copying_into(self.fn, homes)
            record = getattr(api, "record_replay", None)  # a stand-in API replaying in Python
            if record is not None:
                fn = record(fn)
            graph = api.CUDAGraph()
            reserved = getattr(api, "memory_reserved", None) if private else None
            like = _workspace_like(inputs, self.device_type)
            with _blas_workspace(api, self.pool, bool(in_place), like), warnings.catch_warnings(record=True) as caught:
                before = reserved() if reserved is not None else 0
                warnings.simplefilter("always")
                with api.graph(graph, pool=pool):
                    outputs = fn(*inputs)
                own_pool = reserved() - before if reserved is not None else 0
        except Exception as err:  # noqa: BLE001 - capture is an optimisation; never fail the call
            self._forget_if_unused(group)
            if isinstance(err, torch.OutOfMemoryError) and self.pool is not None:
                raise  # not this graph's fault: ``__call__`` frees the session's graphs and runs the call
            self.disabled = f"{type(err).__name__}: {err}"
            log.warning("toprovar: %s cannot be captured in a CUDA graph (%s); it runs without", self.name,
                        self.disabled)
            return None
        for buf in buffers.values():
            buf.forget()
        empty = False
        for w in caught:
            if "CUDA Graph is empty" in str(w.message):
                empty = True
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if empty:
            # Nothing was recorded on the capture stream: either the call launches no kernels
            # (views only) or its kernels ran elsewhere; a replay would do nothing in both
            # cases, so these inputs run without a graph. Expected for graphs of views (one per
            # scale on Infinity), so debug: at info it was 13 lines per compile on the H200.
            self.empty += 1
            self._forget_if_unused(group)
            log.debug("toprovar: %s recorded no kernels for inputs %s; it runs without a CUDA graph", self.name,
                     [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
            return None
        lent = frozenset(homes) | in_place
        for i in borrowed:
            # Held here it would count as an outside reference to the lender's output; if the
            # captured function itself kept the alias (a stand-in API replaying in Python does),
            # the lender's count of references it expects grows by what stays held.
            alias, inputs[i] = inputs[i], None
            with_alias = _use_count(args[i])
            del alias
            owner, position = self.pool.lent[borrowed[i]][1:]
            owner.expect_held(position, 1 - (with_alias - _use_count(args[i])))  # 1: the alias lives on
        if self.pool is not None:
            self.pool.captures += 1
        captured = _Captured(graph, inputs, buffers, outputs, lent, borrowed,
                             pooled=in_place if group is not None else frozenset())
        if group is not None:
            group.join(captured)
        elif in_place:
            self.private += 1
            captured.own_pool_bytes = own_pool
            self._account_private(own_pool)
        for i in lent:
            o = outputs[i] if isinstance(outputs, (tuple, list)) else outputs
            self.pool.lent[o.data_ptr()] = (self.pool.layout(o), captured, i)
        return captured

    def _forget_if_unused(self, group: _Group | None) -> None:
        """Drop a group that no graph was captured into (a failed or empty capture): its pool may
        be marked free with the graph that was not kept, and a later capture into it would fail."""
        if group is not None and not group.members:
            del self.pool.groups[group.key]

    def _lending(self, outputs: Any, inputs: Sequence[Any], lend: bool,
                 args: Sequence[Any]) -> tuple[dict[int, torch.Tensor], frozenset[int], _Group | None]:
        """Where each lendable output is handed out from: per position, a home (a tensor allocated
        here, outside the capture and so outside any memory pool, laid out as the output's clone
        would be), or, for the positions returned second, the captured output itself, when the
        graph is captured into a memory pool of its own or into the pool of the group returned
        third (``_Group``: the graphs with inputs laid out as this call's).

        Why not the captured output in the shared pool: the graphs of a session share one pool,
        and memory one capture freed (its intermediates) may back a later capture's outputs, while
        the earlier graph still writes its intermediates there on every replay. An output in the
        shared pool is therefore only safe until any other graph replays: cloned at once, as
        without lending, it is; lent, it would be overwritten while the caller holds it (on the
        H200, NaN entropies). A home is written only by its own graph, with one copy at the end of
        the replay, inside the graph (no launch), and never while the caller holds it
        (``_Captured.run``). Laid out as a clone, the caller sees the strides it saw before lending
        started, so Dynamo does not recompile the next graph for them.

        The homes' copies cost GPU time: one copy node per output, about 1.4 us each at the small
        scales and the whole K/V cache so far at the larger ones (3.4 ms per generation on
        Infinity-2B, H200; docs/backend.md, tenth session). So outputs laid out as their clone and
        sharing no storage with an input (which belongs to the caller or another graph) are lent in
        place, from a pool where only graphs that check them before replaying write:
        * a graph whose lendable outputs total ``PRIVATE_LEND_MIN_BYTES`` or more gets a pool of
          its own while the session's own pools reserve less than their budget
          (``SharedPool.private_room``): nothing else writes there, but its intermediates stay
          reserved for it;
        * any other goes into its group's pool, whose members replay only while no output of a
          member captured after them is held (``_Group``): one scale's block graphs share their
          intermediates' memory and replay in the order they were captured.
        Outputs that cannot be lent in place (views into a larger buffer, K of a fused QKV) keep
        a home."""
        if not lend or self.pool is None:
            return {}, frozenset(), None
        flat = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        lendable = self._lendable(flat)
        taken = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        in_place = frozenset(i for i in lendable if flat[i].storage_offset() == 0
                             and flat[i].untyped_storage().data_ptr() not in taken
                             and torch.empty_like(flat[i], device="meta").stride() == flat[i].stride())
        homes = {i: torch.empty_like(flat[i]) for i in lendable - in_place}
        if not in_place:
            return homes, in_place, None
        large = sum(flat[i].numel() * flat[i].element_size() for i in lendable) >= PRIVATE_LEND_MIN_BYTES
        if large and self.pool.private_room(self.api):
            return homes, in_place, None
        key = (self.pool.position(), self.n_args,
               *[self.pool.layout(args[i]) if isinstance(args[i], torch.Tensor) else args[i] for i in self.dynamic_idx])
        return homes, in_place, self.pool.group(self.api, key)

    def _account_private(self, nbytes: int) -> None:
        pool = self.pool
        had_room = pool.private_room(self.api)
        pool.private_bytes += nbytes
        if had_room and not pool.private_room(self.api):
            log.info("toprovar: CUDA-graph pools of their own reserve %.0f MiB (budget %.0f MiB, option "
                     "cuda_graph_private_max_mib); later graphs lend from their group's pool",
                     pool.private_bytes / 2**20, pool.private_budget / 2**20)

    @staticmethod
    def _lendable(outputs: Sequence[Any]) -> frozenset[int]:
        """Outputs handed out without a clone: every tensor. At the launch-bound early scales a
        clone costs an allocation and a launch per output, and the next graph a copy in (on the
        H200: 932 clones per generation were the top host op under ``cProfile`` before the
        caller's own outputs were lent, and the hoisted entropy's clone was still about one per
        block call after). The entropies and kept indices a graph returns after the caller's own
        outputs are held by the generation's state until the next generation's first tick, so
        each such graph replays once per generation with nothing of it held. The exception is the
        graph of a generation's first block, which runs before that tick: the entropy recorded at
        the tick is a copy (``Session.record_attention``). Held as lent, that graph would run
        without replay, and with it every graph reading its outputs in place, all generation."""
        return frozenset(i for i, o in enumerate(outputs) if isinstance(o, torch.Tensor))
