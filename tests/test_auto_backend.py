"""backend="auto" by measurement (issue 10): on CPU with an injected timer.

The timer is the only thing replaced: candidates, trial calls, refusals, the cache key, the file
cache and the DDP broadcast are the real code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest
import torch

import relaxedconv as rc
from relaxedconv import auto_backend, dispatch
from relaxedconv.functional import relaxed_conv


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    auto_backend.clear()
    monkeypatch.setattr(auto_backend, "_timer", None)
    monkeypatch.setattr(auto_backend, "_cache_file", None)
    monkeypatch.setattr(dispatch, "_policy_override", None)
    monkeypatch.delenv(dispatch.AUTO_ENV, raising=False)
    monkeypatch.delenv(auto_backend.CACHE_ENV, raising=False)
    yield
    auto_backend.clear()


class FakeTimer:
    """Seconds per backend from a table; records every (backend, key-relevant shape) it timed."""

    def __init__(self, seconds: dict):
        self.seconds = seconds
        self.calls = []

    def __call__(self, run, *, backend, device):
        self.calls.append(backend)
        return self.seconds[backend]


def factors(layer, x, *, grad=True):
    out_hw = layer.geometry.out_size(x.shape[-2], x.shape[-1])
    z, w_ext = layer.factored_kernel(out_hw)
    if not grad:
        z, w_ext = z.detach(), w_ext.detach()
    return z, w_ext


def call(layer, x, backend="auto", policy="measure"):
    z, w_ext = factors(layer, x)
    return relaxed_conv(x, z, w_ext, layer.bias, layer.geometry, backend=backend, auto_policy=policy)


def make(trans=False, k=3, n=4):
    torch.manual_seed(0)
    return rc.GroupConv(2, 3, k, n, hidden_channels=8, translation_nonstationary=trans)


def test_auto_picks_the_fastest_backend_and_runs_it():
    layer, x = make(), torch.randn(2, 8, 6, 7)
    timer = FakeTimer({"materialize": 3.0, "expand_conv": 2.0, "factored_torch": 1.0})
    auto_backend.set_timer(timer)
    y = call(layer, x)
    assert sorted(timer.calls) == ["expand_conv", "factored_torch", "materialize"]  # every runnable CPU backend
    (choice,) = auto_backend.choices().values()
    assert choice.backend == "factored_torch" and choice.source == "measured"
    assert choice.times_ms == {"materialize": 3000.0, "expand_conv": 2000.0, "factored_torch": 1000.0}
    assert torch.allclose(y, call(layer, x, backend="factored_torch"), rtol=1e-6, atol=1e-6)
    # cached for the process: a second call times nothing
    call(layer, x)
    assert len(timer.calls) == 3
    # a translation non-stationary layer never times expand_conv (the table says it cannot run it)
    timer.calls.clear()
    call(make(trans=True), x)
    assert sorted(timer.calls) == ["factored_torch", "materialize"]


def test_the_layer_runs_and_reports_the_measured_choice():
    layer, x = make(), torch.randn(2, 8, 6, 7)
    auto_backend.set_timer(FakeTimer({"materialize": 1.0, "expand_conv": 2.0, "factored_torch": 3.0}))
    dispatch.set_auto_policy("measure")
    y = layer(x)
    assert layer.last_backend == "materialize"
    assert rc.backends_used(torch.nn.Sequential(layer)) == {"0": "materialize"}
    assert torch.allclose(y, layer(x, backend="materialize"))
    assert dispatch.choose_backend(layer, x) == "materialize"


def test_choose_backend_says_what_a_frozen_layer_runs():
    # Timed with gradients, materialize wins; forward only, expand_conv. A layer with frozen
    # parameters runs a forward-only call (x needs no gradient), so choose_backend must say so.
    def timer(run, *, backend, device):
        train = {"materialize": 1.0, "expand_conv": 2.0, "factored_torch": 3.0}
        fwd = {"materialize": 3.0, "expand_conv": 1.0, "factored_torch": 2.0}
        return (train if torch.is_grad_enabled() else fwd)[backend]

    auto_backend.set_timer(timer)
    dispatch.set_auto_policy("measure")
    layer, x = make().requires_grad_(False), torch.randn(2, 8, 6, 7)
    assert dispatch.choose_backend(layer, x) == "expand_conv"
    layer(x)
    assert layer.last_backend == "expand_conv"
    layer.requires_grad_(True)
    assert dispatch.choose_backend(layer, x) == "materialize"
    layer(x)
    assert layer.last_backend == "materialize"


def test_choose_backend_refuses_an_input_the_layer_refuses_and_keeps_no_choice_for_it():
    auto_backend.set_timer(FakeTimer({"materialize": 1.0, "expand_conv": 2.0, "factored_torch": 3.0}))
    dispatch.set_auto_policy("measure")
    layer = make()
    with pytest.raises(ValueError, match=r"choose_backend\(GroupConv\): expected \[B, 2\*4 = 8, H, W\].*got 4 channels"):
        dispatch.choose_backend(layer, torch.randn(2, 4, 6, 7))
    assert auto_backend.choices() == {}
    layer(torch.randn(2, 8, 6, 7))  # the shape's key is measured on a valid input
    assert layer.last_backend == "materialize"


def test_a_functional_call_without_gradients_is_timed_with_building_its_operands(monkeypatch):
    # relaxed_conv builds the backend's operands (expand_conv's bank) in every call; a layer in
    # inference keeps them. Here building the bank costs 10 s and its conv2d 1 s: the functional
    # call must not pick expand_conv for a speed only a cached call has.
    built = []
    entry = dispatch.BACKEND_TABLE["expand_conv"]

    def counting_prepare(*args):
        built.append(1)
        return entry.prepare(*args)

    monkeypatch.setitem(dispatch.BACKEND_TABLE, "expand_conv", dataclasses.replace(entry, prepare=counting_prepare))

    def timer(run, *, backend, device):
        before = len(built)
        run()
        bank = 10.0 if len(built) > before else 0.0
        return {"materialize": 5.0, "expand_conv": 1.0 + bank, "factored_torch": 3.0}[backend]

    auto_backend.set_timer(timer)
    layer, x = make(), torch.randn(2, 8, 6, 7)
    with torch.no_grad():
        z, w_ext = factors(layer, x, grad=False)
        assert relaxed_conv(x, z, w_ext, layer.bias, layer.geometry, auto_policy="measure").shape == (2, 12, 6, 7)
        dispatch.set_auto_policy("measure")
        layer(x)
    assert layer.last_backend == "expand_conv"  # the layer's cached operands: the conv2d alone
    modes = {key[-1]: c.backend for key, c in auto_backend.choices().items()}
    assert modes == {"prepare+fwd": "factored_torch", "fwd": "expand_conv"}


def test_key_separates_dtype_shape_geometry_and_merges_batches_in_a_bucket():
    timer = FakeTimer({"materialize": 1.0, "expand_conv": 2.0, "factored_torch": 3.0})
    auto_backend.set_timer(timer)
    layer = make()

    def timed_after(fn):
        before = len(timer.calls)
        fn()
        return len(timer.calls) - before

    assert timed_after(lambda: call(layer, torch.randn(3, 8, 6, 7))) == 3
    assert timed_after(lambda: call(layer, torch.randn(4, 8, 6, 7))) == 0  # batch 3 and 4: bucket 4
    assert timed_after(lambda: call(layer, torch.randn(5, 8, 6, 7))) == 3  # batch 5: bucket 8
    assert timed_after(lambda: call(layer, torch.randn(4, 8, 6, 8))) == 3  # another width
    assert timed_after(lambda: call(layer.double(), torch.randn(4, 8, 6, 7, dtype=torch.float64))) == 3  # dtype
    layer.float()
    assert timed_after(lambda: call(make(k=5), torch.randn(4, 8, 6, 7))) == 3  # geometry (kernel size)
    with torch.no_grad():  # inference: a forward-only key
        assert timed_after(lambda: call(layer, torch.randn(4, 8, 6, 7))) == 3
    threads = torch.get_num_threads()
    try:  # on the CPU, timings taken with one thread count say nothing of another
        torch.set_num_threads(threads + 1)
        assert timed_after(lambda: call(layer, torch.randn(4, 8, 6, 7))) == 3
    finally:
        torch.set_num_threads(threads)
    assert timed_after(lambda: call(layer, torch.randn(4, 8, 6, 7))) == 0
    assert len(auto_backend.choices()) == 7
    assert [auto_backend.batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 64, 128]
    # the key holds every field of the geometry (spelt out for speed: a new field must be added)
    g = rc.ConvGeometry(2, 3, 4, 5, 7, 1)
    assert auto_backend.geometry_fields(g) == dataclasses.astuple(g)


def test_measuring_leaves_the_callers_random_stream_alone():
    # A run draws the same numbers whether auto measured, read the file or had chosen already.
    auto_backend.set_timer(FakeTimer({"materialize": 1.0, "expand_conv": 2.0, "factored_torch": 3.0}))
    layer, x = make(), torch.randn(2, 8, 6, 7)
    state = torch.get_rng_state()
    call(layer, x)  # measured: fwd+bwd of every backend
    assert auto_backend.choices() and torch.equal(torch.get_rng_state(), state)


def test_an_empty_batch_is_not_measured_and_decides_nothing_for_its_bucket():
    timer = FakeTimer({"materialize": 1.0, "expand_conv": 2.0, "factored_torch": 3.0})
    auto_backend.set_timer(timer)
    layer = make()
    static = dispatch.backend_rule(layer, "cpu", dispatch.triton_available())
    assert static != "materialize"
    dispatch.set_auto_policy("measure")
    y = layer(torch.randn(0, 8, 6, 7))
    assert y.shape == (0, 12, 6, 7) and layer.last_backend == static
    assert timer.calls == [] and auto_backend.choices() == {}
    layer(torch.randn(1, 8, 6, 7))  # batch 1 (the same bucket) is measured on its own data
    assert layer.last_backend == "materialize" and len(timer.calls) == 3


def _replace_apply(monkeypatch, name, fn):
    entry = dispatch.BACKEND_TABLE[name]
    monkeypatch.setitem(dispatch.BACKEND_TABLE, name, dataclasses.replace(entry, apply=fn))


def test_backends_that_run_out_of_memory_or_refuse_are_skipped(monkeypatch):
    def oom(x, operands, g):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    def refuse(x, operands, g):
        raise ValueError("a tensor of 3,000,000,000 elements is beyond the fused kernels' 32-bit indexing")

    _replace_apply(monkeypatch, "factored_torch", oom)
    _replace_apply(monkeypatch, "materialize", refuse)
    timer = FakeTimer({"materialize": 0.1, "expand_conv": 2.0, "factored_torch": 0.1})
    auto_backend.set_timer(timer)
    layer, x = make(), torch.randn(2, 8, 6, 7)
    call(layer, x)
    (choice,) = auto_backend.choices().values()
    assert choice.backend == "expand_conv" and timer.calls == ["expand_conv"]
    assert "out of memory" in choice.skipped["factored_torch"]
    assert "32-bit" in choice.skipped["materialize"]
    # nothing runs: the static rule's choice, which then raises its own clear error
    _replace_apply(monkeypatch, "expand_conv", oom)
    auto_backend.clear()
    with pytest.raises(torch.OutOfMemoryError):
        call(layer, x)
    (choice,) = auto_backend.choices().values()
    assert choice.backend == "expand_conv" and choice.source == "static (nothing ran)"


def test_static_switch_by_argument_setter_and_environment(monkeypatch):
    timer = FakeTimer({"materialize": 0.1, "expand_conv": 2.0, "factored_torch": 3.0})
    auto_backend.set_timer(timer)
    layer, x = make(), torch.randn(2, 8, 6, 7)
    rule = dispatch.backend_rule(layer, "cpu", dispatch.triton_available(), torch.float32)
    assert rule == "expand_conv"
    call(layer, x, policy="static")
    dispatch.set_auto_policy("static")
    layer(x)
    assert layer.last_backend == rule
    dispatch.set_auto_policy(None)
    monkeypatch.setenv(dispatch.AUTO_ENV, "static")
    call(layer, x, policy=None)
    layer(x)
    assert layer.last_backend == rule and timer.calls == []
    # the default on CPU is the static rule too; measuring is opt-in there
    monkeypatch.delenv(dispatch.AUTO_ENV)
    layer(x)
    assert timer.calls == [] and dispatch.auto_policy("cpu") == "static" and dispatch.auto_policy("cuda") == "measure"
    monkeypatch.setenv(dispatch.AUTO_ENV, "measure")
    layer(x)
    assert layer.last_backend == "materialize" and timer.calls
    monkeypatch.setenv(dispatch.AUTO_ENV, "fastest")
    with pytest.raises(ValueError, match="auto policy must be one of .*RELAXEDCONV_AUTO.*'fastest'"):
        layer(x)
    with pytest.raises(ValueError, match="auto policy must be one of"):
        dispatch.set_auto_policy("sometimes")


def test_file_cache_reuses_choices_and_ignores_corrupt_or_stale_files(tmp_path, monkeypatch):
    path = tmp_path / "auto.json"
    auto_backend.set_cache_file(path)
    layer, x = make(), torch.randn(2, 8, 6, 7)
    auto_backend.set_timer(FakeTimer({"materialize": 3.0, "expand_conv": 2.0, "factored_torch": 1.0}))
    call(layer, x)
    data = json.loads(path.read_text())
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["relaxedconv"] == rc.__version__
    (entry,) = data["choices"].values()
    assert entry["backend"] == "factored_torch"

    # a new process (empty process cache) takes the file's choice without timing
    auto_backend.clear()
    timer = FakeTimer({"materialize": 0.1, "expand_conv": 2.0, "factored_torch": 3.0})
    auto_backend.set_timer(timer)
    call(layer, x)
    (choice,) = auto_backend.choices().values()
    assert choice.backend == "factored_torch" and choice.source == "file" and timer.calls == []

    # written by another torch: stale, ignored with a warning, measured again and rewritten
    data["versions"]["torch"] = "0.0.1"
    path.write_text(json.dumps(data))
    auto_backend.clear()
    with pytest.warns(UserWarning, match="other versions \\(torch changed\\)"):
        call(layer, x)
    assert next(iter(auto_backend.choices().values())).backend == "materialize"
    assert json.loads(path.read_text())["versions"]["torch"] == torch.__version__

    # corrupt: ignored with a warning, never an error
    path.write_text("{ not json")
    auto_backend.clear()
    with pytest.warns(UserWarning, match="unreadable"):
        call(layer, x)
    assert json.loads(path.read_text())["format"] == auto_backend.CACHE_FORMAT

    # the environment variable selects the default path under the user's cache directory
    auto_backend.set_cache_file(None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(auto_backend.CACHE_ENV, "1")
    assert auto_backend.cache_path() == tmp_path / "cache" / "relaxedconv" / "auto_backend.json"
    monkeypatch.setenv(auto_backend.CACHE_ENV, "0")
    assert auto_backend.cache_path() is None


def test_file_choices_are_kept_apart_per_triton_switch(tmp_path, monkeypatch):
    # A process run with another Triton backward (or tile config) times another backend: it must
    # not take the choice a process with the default switches wrote.
    monkeypatch.delenv("RELAXEDCONV_TRITON_STATIONARY_BACKWARD", raising=False)
    auto_backend.set_cache_file(tmp_path / "auto.json")
    layer, x = make(), torch.randn(2, 8, 6, 7)
    auto_backend.set_timer(FakeTimer({"materialize": 3.0, "expand_conv": 2.0, "factored_torch": 1.0}))
    call(layer, x)
    monkeypatch.setenv("RELAXEDCONV_TRITON_STATIONARY_BACKWARD", "fused")
    auto_backend.clear()
    timer = FakeTimer({"materialize": 3.0, "expand_conv": 1.0, "factored_torch": 2.0})
    auto_backend.set_timer(timer)
    call(layer, x)
    assert len(timer.calls) == 3 and next(iter(auto_backend.choices().values())).backend == "expand_conv"
    assert len(json.loads((tmp_path / "auto.json").read_text())["choices"]) == 2
    monkeypatch.delenv("RELAXEDCONV_TRITON_STATIONARY_BACKWARD")  # back to the first setting: its entry
    auto_backend.clear()
    call(layer, x)
    (choice,) = auto_backend.choices().values()
    assert choice.backend == "factored_torch" and choice.source == "file" and len(timer.calls) == 3


def test_unwritable_cache_warns_and_keeps_the_choice(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    auto_backend.set_cache_file(blocker / "sub" / "auto.json")  # a directory under a file
    auto_backend.set_timer(FakeTimer({"materialize": 3.0, "expand_conv": 1.0, "factored_torch": 2.0}))
    layer, x = make(), torch.randn(2, 8, 6, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(layer, x)
    assert any("could not write" in str(w.message) for w in caught)
    assert next(iter(auto_backend.choices().values())).backend == "expand_conv"


def test_cache_settings_off_on_words_directories_and_bad_types(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = auto_backend.default_cache_path()
    for off in ("off", "false", "No", " 0 ", ""):  # never a file called "off" in the working directory
        monkeypatch.setenv(auto_backend.CACHE_ENV, off)
        assert auto_backend.cache_path() is None
    for on in ("1", "on", "TRUE", "yes "):
        monkeypatch.setenv(auto_backend.CACHE_ENV, on)
        assert auto_backend.cache_path() == default
    # a directory (existing, or named with a trailing slash) holds the default file name
    monkeypatch.setenv(auto_backend.CACHE_ENV, str(tmp_path))
    assert auto_backend.cache_path() == tmp_path / "auto_backend.json"
    monkeypatch.setenv(auto_backend.CACHE_ENV, str(tmp_path / "new") + "/")
    assert auto_backend.cache_path() == tmp_path / "new" / "auto_backend.json"
    auto_backend.set_timer(FakeTimer({"materialize": 3.0, "expand_conv": 1.0, "factored_torch": 2.0}))
    call(make(), torch.randn(2, 8, 6, 7))
    assert json.loads((tmp_path / "new" / "auto_backend.json").read_text())["format"] == auto_backend.CACHE_FORMAT
    auto_backend.set_cache_file(tmp_path)
    assert auto_backend.cache_path() == tmp_path / "auto_backend.json"
    with pytest.raises(TypeError, match="set_cache_file takes a path, True, False or None, got int"):
        auto_backend.set_cache_file(1)


def test_a_failed_cache_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(auto_backend.os, "replace", refuse)  # the last step fails, after the temporary write
    auto_backend.set_cache_file(tmp_path / "auto.json")
    auto_backend.set_timer(FakeTimer({"materialize": 3.0, "expand_conv": 1.0, "factored_torch": 2.0}))
    with pytest.warns(UserWarning, match="could not write .*Permission denied"):
        call(make(), torch.randn(2, 8, 6, 7))
    assert list(tmp_path.iterdir()) == []


# ---- DDP: two gloo processes -------------------------------------------------------------------------
def _rank_timer(run, *, backend, device):
    """Each rank would pick a different backend on its own."""
    rank = torch.distributed.get_rank()
    fastest = "factored_torch" if rank == 0 else "materialize"
    return 0.001 if backend == fastest else 1.0


def _ddp_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        auto_backend.set_timer(_rank_timer)
        dispatch.set_auto_policy("measure")
        layer = make()
        layer(torch.randn(0 if rank == 0 else 1, 8, 6, 7))  # rank 0's share of this step is empty
        empty_kept = len(auto_backend.choices())  # it decides nothing, on either rank
        layer(torch.randn(1, 8, 6, 7))
        batch1 = layer.last_backend
        seen = []
        for batch in (2, 3, 2):
            layer(torch.randn(batch, 8, 6, 7))
            seen.append(layer.last_backend)
        sources = sorted({c.source for c in auto_backend.choices().values()})
        # inference with a batch only this rank has (an uneven evaluation split): decided locally,
        # no collective that the other rank would never join
        with torch.no_grad():
            layer(torch.randn(5 + 10 * rank, 8, 6, 7))
        seen.append(layer.last_backend)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"backends": seen, "sources": sources, "empty_kept": empty_kept, "batch1": batch1}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_every_ddp_rank_runs_rank_zeros_choice(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["backends"][:3] == r1["backends"][:3] == ["factored_torch"] * 3
    assert r0["sources"] == ["measured"] and r1["sources"] == ["rank 0"]
    assert r0["backends"][3] == "factored_torch" and r1["backends"][3] == "materialize"  # per rank
    assert r0["empty_kept"] == r1["empty_kept"] == 0 and r0["batch1"] == r1["batch1"] == "factored_torch"


def test_a_trainer_sets_its_auto_policy_for_its_run_only(tmp_path):
    """A Trainer set its run's policy process-wide in its constructor: it outlived the run and
    replaced what the caller had set (here: "static" became None, i.e. measure on CUDA)."""
    from relaxedconv.training.trainer import Trainer

    seen = []
    dispatch.set_auto_policy("static")
    try:
        trainer = Trainer({"out": str(tmp_path / "run"), "auto_policy": "measure"})
        assert dispatch.auto_policy("cuda") == "static"  # building a Trainer changes nothing
        trainer._run = lambda resume: seen.append(dispatch.auto_policy("cpu"))
        trainer.run()
        assert seen == ["measure"] and dispatch.auto_policy("cuda") == "static"
    finally:
        dispatch.set_auto_policy(None)
