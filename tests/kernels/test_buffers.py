"""The output-buffer cache (`batchnorm.kernels.buffers`): reuse only of dead buffers, torch's strides,
the byte limit and the high-water bound with LRU eviction, thread safety, a BN layer that matches
torch with reuse on, and resident memory near torch's over a loop with varying batch sizes."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import batchnorm
from batchnorm.kernels import buffers

MIB = 1 << 20
LIKE = torch.empty(2 * MIB // 4)  # 2 MiB of float32: above the small-tensor threshold


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts with an empty cache at the default limit and leaves the limit as it was."""
    gc.collect()
    previous = buffers.limit()
    buffers.set_limit(1 << 30)
    buffers.empty_cache()
    try:
        yield
    finally:
        buffers.set_limit(previous)
        buffers.empty_cache()


def like(nbytes, dtype=torch.float32):
    return torch.empty(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype)


def in_use():
    return buffers.cached_bytes()[0]


def test_reuse_after_the_tensor_is_dropped():
    t = buffers.empty(LIKE, torch.contiguous_format)
    ptr = t.data_ptr()
    assert buffers.cached_bytes() == (LIKE.nbytes, 0)
    del t
    assert buffers.cached_bytes() == (0, LIKE.nbytes)
    again = buffers.empty(LIKE, torch.contiguous_format)
    assert again.data_ptr() == ptr
    assert buffers.cached_bytes() == (LIKE.nbytes, 0)


def _saved_for_backward(t):
    w = torch.ones((), requires_grad=True)
    return w * t  # mul saves t to compute the gradient of w


HOLDERS = [
    pytest.param(lambda t: t, id="tensor"),
    pytest.param(lambda t: t[2:].view(-1, 2), id="view"),
    pytest.param(lambda t: t.untyped_storage(), id="storage"),
    pytest.param(lambda t: t.numpy(), id="numpy_view"),
    pytest.param(_saved_for_backward, id="autograd_saved"),
]


@pytest.mark.parametrize("hold", HOLDERS)
def test_no_reuse_while_anything_holds_the_memory(hold):
    t = buffers.empty(LIKE, torch.contiguous_format)
    ptr = t.data_ptr()
    holder = hold(t)
    del t
    other = buffers.empty(LIKE, torch.contiguous_format)
    assert other.data_ptr() != ptr
    assert buffers.cached_bytes() == (2 * LIKE.nbytes, 0)
    del holder
    assert buffers.cached_bytes() == (LIKE.nbytes, LIKE.nbytes)  # released: idle again
    assert buffers.empty(LIKE, torch.contiguous_format).data_ptr() == ptr


def test_a_kept_graph_keeps_its_saved_tensor_intact():
    w = torch.ones((), requires_grad=True)
    t = buffers.empty(LIKE, torch.contiguous_format).fill_(3.0)
    out = w * t  # saves t
    del t
    buffers.empty(LIKE, torch.contiguous_format).fill_(-1.0)  # would overwrite a wrongly reused buffer
    (dw,) = torch.autograd.grad(out.sum(), [w])
    assert dw.item() == 3.0 * LIKE.numel()


CL, CL3, CONTIG = torch.channels_last, torch.channels_last_3d, torch.contiguous_format
STRIDE_CASES = [
    pytest.param((4096, 160), CONTIG, id="2D"),
    pytest.param((64, 41, 101), CONTIG, id="3D"),
    pytest.param((8, 32, 33, 35), CONTIG, id="4D"),
    pytest.param((8, 32, 33, 35), CL, id="4D_channels_last"),
    pytest.param((1, 1, 512, 1024), CL, id="4D_channels_last_C1_N1"),
    pytest.param((262144, 3, 1, 1), CL, id="4D_channels_last_HW1"),
    pytest.param((2, 16, 9, 30, 31), CONTIG, id="5D"),
    pytest.param((2, 16, 9, 30, 31), CL3, id="5D_channels_last_3d"),
    pytest.param((65536, 8, 1, 1, 1), CL3, id="5D_channels_last_3d_DHW1"),
]


# float16 and int32 are handed out as typed NumPy views; bfloat16, which NumPy lacks, as torch views of raw bytes
DTYPES = [torch.float32, torch.float64, torch.float16, torch.int32, torch.bfloat16]


@pytest.mark.parametrize("dtype", [pytest.param(d, id=str(d).removeprefix("torch.")) for d in DTYPES])
@pytest.mark.parametrize("shape, fmt", STRIDE_CASES)
def test_layout_matches_empty_like(shape, fmt, dtype):
    x = torch.empty(shape, dtype=dtype)
    expected = torch.empty_like(x, memory_format=fmt)
    for _ in range(2):  # a new buffer, then a reused one
        t = buffers.empty(x, fmt)
        assert in_use() == x.nbytes  # it came from the cache
        assert (t.shape, t.stride(), t.dtype, t.storage_offset()) == (expected.shape, expected.stride(), dtype, 0)
        assert t.is_contiguous(memory_format=fmt)
        assert t.untyped_storage().nbytes() == x.nbytes
        assert not t.requires_grad
        values = torch.arange(t.numel(), dtype=dtype).view(shape)
        t.copy_(values)  # every element addressable, no two elements aliased
        assert torch.equal(t, values)
        del t


def test_one_buffer_serves_every_shape_of_its_byte_size():
    """A freed buffer goes to the next request of the same byte size whatever its shape, dtype or
    format, each time laid out as torch would; more shapes than the per-buffer layout memo keeps
    (8) still come out right."""
    nbytes = 4 * MIB
    requests = [
        ((1024, 1024), torch.float32, CONTIG),
        ((512, 1024), torch.float64, CONTIG),
        ((16, 64, 32, 32), torch.float32, CL),
        ((16, 64, 32, 32), torch.float32, CONTIG),
        ((8, 64, 32, 32), torch.float64, CL),
        ((4, 16, 16, 32, 32), torch.float32, CL3),
        ((1024, 1024), torch.int32, CONTIG),
        ((2048, 1024), torch.bfloat16, CONTIG),
    ] + [((2 ** k, nbytes // 4 // 2 ** k), torch.float32, CONTIG) for k in range(4, 12)]
    addresses = set()
    for round_ in range(2):
        for shape, dtype, fmt in requests:
            x = torch.empty(shape, dtype=dtype)
            assert x.nbytes == nbytes
            t = buffers.empty(x, fmt)
            expected = torch.empty_like(x, memory_format=fmt)
            assert (t.shape, t.stride(), t.dtype) == (expected.shape, expected.stride(), dtype), (round_, shape, dtype, fmt)
            values = torch.arange(t.numel()).view(shape).to(dtype)
            t.copy_(values)
            assert torch.equal(t, values)
            addresses.add(t.data_ptr())
            del t
    assert len(addresses) == 1 and buffers.cached_bytes() == (0, nbytes)


def test_small_tensors_and_other_formats_bypass_the_cache():
    small = buffers.empty(torch.empty(buffers.MIN_BYTES // 4 - 1), CONTIG)
    preserve = buffers.empty(torch.empty(8, 32, 33, 35).contiguous(memory_format=CL), torch.preserve_format)
    assert preserve.is_contiguous(memory_format=CL)
    assert buffers.cached_bytes() == (0, 0)
    del small, preserve
    with pytest.raises(RuntimeError):  # torch's own error for a format the shape cannot have
        buffers.empty(torch.empty(4096, 160), CL)


def test_limit_is_respected_and_overflow_is_served_by_torch():
    buffers.set_limit(3 * LIKE.nbytes)
    held = [buffers.empty(LIKE, CONTIG) for _ in range(3)]
    assert buffers.cached_bytes() == (3 * LIKE.nbytes, 0)
    extra = buffers.empty(LIKE, CONTIG).fill_(7.0)  # over the limit: plain torch, never an error
    assert buffers.cached_bytes() == (3 * LIKE.nbytes, 0)
    assert extra.untyped_storage().resizable()  # torch's own storage, not a cached buffer
    assert len({t.data_ptr() for t in held + [extra]}) == 4
    assert (extra == 7.0).all()
    too_big = buffers.empty(like(4 * LIKE.nbytes), CONTIG)
    assert buffers.cached_bytes() == (3 * LIKE.nbytes, 0)
    del too_big


def test_eviction_is_least_recently_used_first():
    a, b, c = like(2 * MIB), like(3 * MIB), like(5 * MIB // 2)
    buffers.set_limit(6 * MIB)
    first_a, first_b = buffers.empty(a, CONTIG), buffers.empty(b, CONTIG)  # in use at once: a 5 MiB mark
    ptr_a = first_a.data_ptr()
    del first_a, first_b
    assert buffers.empty(a, CONTIG).data_ptr() == ptr_a  # a used again: b is now the oldest
    assert buffers.cached_bytes() == (0, 5 * MIB)
    buffers.empty(c, CONTIG)  # 7.5 MiB would exceed the 5 MiB mark: evict b (LRU), keep a
    assert buffers.cached_bytes() == (0, 2 * MIB + 5 * MIB // 2)
    held = buffers.empty(a, CONTIG)
    assert held.data_ptr() == ptr_a
    assert buffers.cached_bytes() == (2 * MIB, 5 * MIB // 2)
    buffers.empty(b, CONTIG)  # 7.5 MiB again: a is in use, so c (the only idle one) goes
    assert buffers.cached_bytes() == (2 * MIB, 3 * MIB)
    buffers.set_limit(4 * MIB)  # the limit bounds below the mark: the idle b goes too
    assert buffers.cached_bytes() == (2 * MIB, 0)
    del held


def test_lowering_the_limit_frees_idle_buffers():
    held = buffers.empty(LIKE, CONTIG)
    buffers.empty(like(3 * MIB), CONTIG)
    assert buffers.cached_bytes() == (LIKE.nbytes, 3 * MIB)
    buffers.set_limit(4 * MIB)
    assert buffers.cached_bytes() == (LIKE.nbytes, 0)
    del held


def test_limit_zero_disables_the_cache():
    held = buffers.empty(LIKE, CONTIG)
    buffers.set_limit(0)
    plain = buffers.empty(LIKE, CONTIG)
    assert plain.untyped_storage().resizable()
    del held
    buffers.empty(LIKE, CONTIG)
    assert buffers.cached_bytes() == (0, 0)  # what was in use is dropped once released


@pytest.mark.parametrize("bad", [-1, 1.5, "1024", None, True])
def test_set_limit_rejects_what_is_not_a_byte_count(bad):
    with pytest.raises(ValueError, match="int >= 0"):
        buffers.set_limit(bad)


@pytest.mark.parametrize("text, expected", [("0", 0), ("16", 16 * MIB), ("0.5", MIB // 2), (None, 1 << 30)])
def test_limit_from_the_environment(monkeypatch, text, expected):
    if text is None:
        monkeypatch.delenv("BATCHNORM_BUFFER_CACHE_MB", raising=False)
    else:
        monkeypatch.setenv("BATCHNORM_BUFFER_CACHE_MB", text)
    assert buffers._limit_from_env() == expected


@pytest.mark.parametrize("text", ["lots", "-1"])
def test_bad_environment_value_is_a_clear_error(monkeypatch, text):
    monkeypatch.setenv("BATCHNORM_BUFFER_CACHE_MB", text)
    with pytest.raises(ValueError, match=f"BATCHNORM_BUFFER_CACHE_MB.*got '{text}'"):
        buffers._limit_from_env()


def test_environment_is_read_at_import():
    env = dict(os.environ, BATCHNORM_BUFFER_CACHE_MB="3")
    code = "from batchnorm.kernels import buffers; print(buffers.limit())"
    src = os.path.join(os.path.dirname(batchnorm.__file__), os.pardir)
    env["PYTHONPATH"] = os.path.abspath(src)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == 3 * MIB


def test_empty_cache_frees_idle_buffers_only():
    held = buffers.empty(LIKE, CONTIG)
    buffers.empty(like(3 * MIB), CONTIG)
    buffers.empty_cache()
    assert buffers.cached_bytes() == (LIKE.nbytes, 0)
    ptr = held.data_ptr()
    del held
    assert buffers.cached_bytes() == (0, LIKE.nbytes)
    assert buffers.empty(LIKE, CONTIG).data_ptr() == ptr


def test_threads_never_share_a_live_buffer(monkeypatch):
    idle = buffers._Entry.idle

    def slow_idle(entry):  # widen the race between "is it idle?" and "mark it in use"
        answer = idle(entry)
        time.sleep(1e-4)
        return answer

    monkeypatch.setattr(buffers._Entry, "idle", slow_idle)
    live, live_lock, errors = set(), threading.Lock(), []
    start = threading.Barrier(2)

    def work(value):
        start.wait()
        for _ in range(150):
            t = buffers.empty(LIKE, CONTIG)
            with live_lock:
                if t.data_ptr() in live:
                    errors.append(f"buffer {t.data_ptr():#x} handed out twice")
                live.add(t.data_ptr())
            t.fill_(value)
            if not (t == value).all():
                errors.append(f"thread {value}: its buffer was overwritten")
            with live_lock:
                live.discard(t.data_ptr())
            del t

    threads = [threading.Thread(target=work, args=(v,)) for v in (1.0, 2.0)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    in_use_bytes, idle_bytes = buffers.cached_bytes()
    assert in_use_bytes == 0 and LIKE.nbytes <= idle_bytes <= 2 * LIKE.nbytes  # reused, at most one per thread


# Tolerances against torch in float32: y and dx are elementwise; dweight and dbias are sums over
# 51 200 elements that torch accumulates in float32. A stale value from a reused buffer is O(1) off.
F32_TOL = {"y": 1e-4, "dx": 1e-4, "dweight": 1e-3, "dbias": 1e-3}


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")])
@pytest.mark.parametrize("fmt", [pytest.param(CONTIG, id="NCHW"), pytest.param(CL, id="channels_last")])
def test_batchnorm_with_reused_buffers_matches_torch(force_kernels, fmt, dtype):
    """Several training steps, then eval: outputs, gradients and running statistics equal torch's while
    y and dx land in buffers that still hold the previous step's values (no stale data leaks)."""
    shape = (8, 32, 40, 40)  # 1.6 MB in float32
    ours, theirs = batchnorm.BatchNorm2d(32).to(dtype), torch.nn.BatchNorm2d(32).to(dtype)
    with torch.no_grad():
        for bn in (ours, theirs):
            bn.weight.copy_(torch.linspace(0.5, 2.0, 32))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, 32))
    g = torch.Generator().manual_seed(0)
    pointers = []
    for step in range(5):
        x = (torch.randn(shape, generator=g, dtype=dtype) * (step + 1) + step).contiguous(memory_format=fmt)
        x.requires_grad_()
        dy = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=fmt)
        results = []
        for bn in (ours, theirs):
            y = bn(x)
            results.append((y.detach(), *torch.autograd.grad(y, (x, bn.weight, bn.bias), dy)))
        pointers.append((results[0][0].data_ptr(), results[0][1].data_ptr()))
        for name, got, want in zip(F32_TOL, *results):
            tol = F32_TOL[name] if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"step {step}, {name}: {m}")
        assert results[0][0].is_contiguous(memory_format=fmt)
        del results, y
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert len(set(pointers)) < len(pointers)  # the cache handed y's and dx's buffers back
    ours.eval(), theirs.eval()
    x = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=fmt)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


# The quick form of benchmarks/buffer_memory.py: 10 training steps of BN-ReLU-BN-ReLU on (N, 8, 64, 64),
# N drawn from 257-320, so that every output is 32-40 MiB: above glibc's largest mmap threshold,
# so torch's freed outputs go straight back to the OS and its resident set stays at one step's
# peak; a cache that kept idle buffers of every batch size would grow by ~40 MiB per new size.
MEMORY_CHECK = ["--model", "bn", "--steps", "10", "--min-batch", "257", "--max-batch", "320", "--channels", "8", "--side", "64"]
BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks", "buffer_memory.py")


@pytest.mark.slow  # two fresh interpreters loading torch and Numba: ~8 s of CPU each
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_resident_memory_with_varying_batch_sizes_stays_near_torchs():
    """Ours against torch.nn's BN in two fresh processes (same model, weights and batch sizes,
    same baseline: both load the kernels first): the whole process's peak resident set (VmHWM)
    and its resident set after the loop are at most 1.3x torch's (issue 15's bound).

    A memory check, not a timing: the figures are deterministic up to a few MiB. The margin:
    measured 1.05x peak and 1.08x after the loop with the bounded cache; before it (a cache owning
    up to its 1 GiB limit of idle buffers) 1.43x and 1.71x at 8 steps, growing with every step."""
    import importlib.util

    if not os.path.exists(BENCHMARK):
        pytest.skip("benchmarks/ is not here (not a source checkout)")
    spec = importlib.util.spec_from_file_location("buffer_memory", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.compare(MEMORY_CHECK)
    ours, theirs = result["ours"], result["torch"]
    summary = f"ours {ours}, torch {theirs} (KiB)"
    assert abs(ours["baseline_kib"] - theirs["baseline_kib"]) < 0.1 * theirs["baseline_kib"], summary  # a fair start
    assert result["peak_ratio"] <= 1.3, summary
    assert result["end_ratio"] <= 1.3, summary


def _step(sizes):
    """One "training step": buffers of `sizes` bytes in use at once, then released; their addresses."""
    held = [buffers.empty(like(n), CONTIG) for n in sizes]
    return [t.data_ptr() for t in held]


def test_owns_no_more_than_the_most_ever_in_use_when_sizes_vary():
    """Steps of three outputs each, a new batch size every step: the cache owns at most what one
    step had in use at once (the high-water mark), not an idle buffer per size it has seen."""
    peak = 0
    for step in range(12):
        size = (2 + step % 5) * MIB + step * 4096  # every step a size not seen before
        _step([size] * 3)
        peak = max(peak, 3 * size)
        assert sum(buffers.cached_bytes()) <= peak, (step, buffers.cached_bytes(), peak)


def test_a_steady_step_reuses_every_buffer():
    """The cache's purpose kept: with a repeated step, every output lands in the buffer it had."""
    sizes = [2 * MIB, 3 * MIB, 2 * MIB, 5 * MIB]
    first = _step(sizes)
    for _ in range(3):
        assert sorted(_step(sizes)) == sorted(first)
    assert buffers.cached_bytes() == (0, sum(sizes))


def test_empty_cache_returns_memory_and_resets_the_mark():
    _step([4 * MIB] * 3)
    buffers.empty_cache()
    assert buffers.cached_bytes() == (0, 0)
    _step([2 * MIB])
    _step([3 * MIB])  # the mark is 3 MiB now, not the 12 MiB before empty_cache: the 2 MiB buffer goes
    assert buffers.cached_bytes() == (0, 3 * MIB)


def _counting_new_buffers(monkeypatch) -> list:
    """Record the size of every buffer the cache maps from now on."""
    made, new_buffer = [], buffers._new_buffer

    def counted(nbytes):
        made.append(nbytes)
        return new_buffer(nbytes)

    monkeypatch.setattr(buffers, "_new_buffer", counted)
    return made


def _forward_then_backward_step():
    """A ResNet-like step in miniature: two 2 MiB outputs in use at once (the forward's), released,
    then one 4 MiB output (the backward's). The mark is 4 MiB, but exact-size reuse needs 8 MiB of
    buffers: under the mark alone, each phase evicted the other's buffers, every step."""
    _step([2 * MIB, 2 * MIB])
    _step([4 * MIB])


def test_a_loop_that_needs_more_sizes_than_its_mark_stops_evicting(monkeypatch):
    made = _counting_new_buffers(monkeypatch)
    for _ in range(2):  # the first step maps its buffers, the second learns the sizes come back
        _forward_then_backward_step()
    made.clear()
    for step in range(5):
        _forward_then_backward_step()
        assert made == [], f"step {step}: mapped {made} again"
    assert buffers.cached_bytes() == (0, 8 * MIB)  # what the step needs, at most twice the mark


def test_the_allowance_never_lets_the_cache_own_more_than_twice_the_mark():
    """Sizes that keep coming back, more of them than the mark holds: the cache grows past the
    mark (it earns an allowance) but never owns more than twice it."""
    sizes = [(2 + k) * MIB for k in range(6)]  # 2..7 MiB, one in use at a time: a 7 MiB mark
    owned = []
    for _ in range(4):
        for size in sizes:
            _step([size])
            owned.append(sum(buffers.cached_bytes()))
    assert max(owned) > 7 * MIB  # the allowance was earned
    assert max(owned) <= 2 * 7 * MIB, owned


def test_empty_cache_forgets_the_allowance(monkeypatch):
    for _ in range(3):
        _forward_then_backward_step()
    assert sum(buffers.cached_bytes()) == 8 * MIB
    buffers.empty_cache()
    made = _counting_new_buffers(monkeypatch)
    _forward_then_backward_step()  # a fresh start: the mark alone, so the 4 MiB request evicts
    assert made == [2 * MIB, 2 * MIB, 4 * MIB]
    assert buffers.cached_bytes() == (0, 4 * MIB)
