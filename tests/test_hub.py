"""Models by their Hub id, without the internet: a pre-populated HF cache, and a local stand-in for the Hub
(tests/hub_server.py) that serves a multi-shard random OPT repo with faults: errors, a connection cut, a
truncated or corrupt body, a slow link, and a request log that proves what each load asked for."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import qopt
from qopt import cli
from qopt.errors import ConfigError, DownloadError, HubAccessError, HubError, HubOfflineError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_hf_model  # noqa: E402
from hub_server import Fault, FakeHub, git_blob_id, hub_environment, tree_files  # noqa: E402

REPO = "org/tiny-opt"
IDS = torch.tensor([[2, 31, 415, 7, 99, 5]])


# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random OPT in several safetensors shards (with the tokenizer files) and the same weights in one
    pytorch_model.bin as facebook/opt-125m ships them (`decoder.*` keys); returns (safetensors folder, .bin folder,
    reference logits)."""
    from qopt.bundled import bundled_tokenizer_dir

    root = tmp_path_factory.mktemp("hub-src")
    model = make_hf_model(peaky=4.0)
    model.save_pretrained(root / "st", max_shard_size="150KB")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bundled_tokenizer_dir() / name, root / "st" / name)
    shutil.copy(root / "st" / "config.json", (root / "bin").mkdir() or root / "bin" / "config.json")
    state = {k.removeprefix("model."): v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, root / "bin" / "pytorch_model.bin")
    with torch.no_grad():
        reference = model(IDS).logits
    return root / "st", root / "bin", reference


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """One shard larger than huggingface_hub's 10 MiB write unit (its embedding), so that a cut or a Ctrl-C
    mid-shard leaves written bytes to resume from; returns (folder, its shards, reference logits)."""
    folder = tmp_path_factory.mktemp("hub-big") / "st"
    model = make_hf_model(vocab_size=24000, hidden_size=256, ffn_dim=256, num_hidden_layers=1)
    model.save_pretrained(folder, max_shard_size="20MB")
    with torch.no_grad():
        reference = model(IDS).logits
    return folder, shard_names(folder), reference


@pytest.fixture
def hub(tmp_path, monkeypatch, checkpoints):
    """The stand-in Hub serving REPO, with this process's environment pointed at it and at a fresh cache."""
    with FakeHub() as server:
        server.chunk = 16 * 1024
        server.add_repo(REPO, tree_files(checkpoints[0]))
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in hub_environment(server, tmp_path / "cache").items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr("tempfile.tempdir", str((tmp_path / "tmp").mkdir() or tmp_path / "tmp"))
        yield server


def shard_names(folder: Path, suffix: str = ".safetensors") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(suffix))


def storage(tmp_path: Path, repo: str = REPO) -> Path:
    return tmp_path / "cache" / ("models--" + repo.replace("/", "--"))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


class Events(logging.Handler):
    """The stream's steps, in order, from any thread: ("download_start", k), ("consume_end", k), ..."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, int]] = []
        self.on_event = None

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "qopt_event", None)
        if event is not None:
            self.seen.append(event)
            if self.on_event is not None:
                self.on_event(event)


@pytest.fixture
def events():
    handler, logger = Events(), logging.getLogger("qopt.io.download")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


# -- (1) a pre-populated cache, no server -----------------------------------------------------------------------
def _populate(cache: Path, repo: str, commit: str, folder: Path, refs: dict[str, str], skip: str = "") -> None:
    """The HF cache layout by hand: blobs named by sha256 / git id, snapshot links, refs."""
    import hashlib

    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "snapshots" / commit).mkdir(parents=True)
    for file in folder.iterdir():
        if file.name == skip:
            continue
        data = file.read_bytes()
        blob = root / "blobs" / (hashlib.sha256(data).hexdigest() if file.suffix in (".safetensors", ".bin")
                                 else git_blob_id(data))
        blob.write_bytes(data)
        (root / "snapshots" / commit / file.name).symlink_to(os.path.relpath(blob, root / "snapshots" / commit))
    for ref, target in refs.items():
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(target)


def test_cached_model_loads_offline_with_revisions_pinned(tmp_path, monkeypatch, checkpoints):
    st, _, reference = checkpoints
    other = tmp_path / "other"  # a second commit: the same shapes, another seed
    make_hf_model(seed=1).save_pretrained(other, max_shard_size="150KB")
    old, new = "1" * 40, "2" * 40
    _populate(tmp_path / "cache", REPO, old, st, {"v1": old})
    _populate(tmp_path / "cache", REPO, new, other, {"main": new})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never contacted

    main = qopt.load(REPO, progress=False)
    assert main.name_or_path == REPO and not torch.allclose(logits(main), reference)
    for revision in ("v1", old):
        assert torch.allclose(logits(qopt.load(REPO, revision=revision, progress=False)), reference, atol=1e-5)
    with pytest.raises(HubOfflineError, match=rf"{REPO}: downloads are off \(HF_HUB_OFFLINE=1\).*revision 'v2'.*"
                                              r"refs/v2.*local checkpoint folder"):
        qopt.load(REPO, revision="v2", progress=False)
    with pytest.raises(HubOfflineError, match=r"org/absent: downloads are off.*looked for .*models--org--absent"):
        qopt.load("org/absent", progress=False)
    # local_files_only does the same without the environment variable
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(HubOfflineError, match=r"local_files_only=True"):
        qopt.load("org/absent", local_files_only=True, progress=False)


def test_unreachable_hub_falls_back_to_the_cache_and_names_incomplete_copies(tmp_path, monkeypatch, checkpoints):
    st, _, reference = checkpoints
    commit = "3" * 40
    _populate(tmp_path / "cache", REPO, commit, st, {"main": commit})
    _populate(tmp_path / "cache", "org/partial", commit, st, {"main": commit}, skip=shard_names(st)[1])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    assert torch.allclose(logits(qopt.load(REPO, progress=False)), reference, atol=1e-5)
    with pytest.raises(HubOfflineError, match=rf"org/partial@33333333: .*cannot be reached.*incomplete \(missing "
                                              rf"{shard_names(st)[1]}\)"):
        qopt.load("org/partial", progress=False)


def test_settings_are_read_from_the_environment_at_each_call(tmp_path, monkeypatch):
    from qopt.io.hub import HubSettings

    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
                "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    settings = HubSettings.from_env()
    assert (settings.cache_dir, settings.token, settings.offline) == (tmp_path / "home" / "hub", False, False)
    assert settings.endpoint == "https://huggingface.co"
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "token").write_text("from-file\n")
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example/")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    settings = HubSettings.from_env()
    assert (settings.token, settings.endpoint, settings.offline_reason) == \
        ("from-file", "http://mirror.example", "TRANSFORMERS_OFFLINE=1")
    monkeypatch.setenv("HF_TOKEN", "from-env")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    settings = HubSettings.from_env(cache_dir=tmp_path / "given")
    assert (settings.token, settings.cache_dir) == ("from-env", tmp_path / "given")
    assert HubSettings.from_env(token="explicit").token == "explicit"
    assert HubSettings.from_env().cache_dir == tmp_path / "elsewhere"


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ConfigError, match="missing: no such checkpoint folder .*, and not a Hub model id"):
        qopt.load(tmp_path / "missing", progress=False)
    with pytest.raises(ValueError, match="a revision applies to Hub ids only"):
        qopt.load(tmp_path, revision="main", progress=False)


# -- (2) the stand-in Hub -----------------------------------------------------------------------------------------
def test_download_fills_the_cache_then_loads_without_requests(hub, tmp_path, monkeypatch, checkpoints):
    st, _, reference = checkpoints
    model = qopt.load(REPO, quantization="nf4", torch_dtype="float32", progress=False)
    local = qopt.load(st, quantization="nf4", torch_dtype="float32", progress=False)
    assert model.name_or_path == REPO and torch.equal(logits(model), logits(local))
    root = storage(tmp_path)
    commit = (root / "refs" / "main").read_text()
    snapshot = root / "snapshots" / commit
    for name in shard_names(st):  # blobs named by the LFS sha256, linked from the snapshot
        link = snapshot / name
        assert link.is_symlink() and link.resolve().parent == root / "blobs"
        assert link.resolve().name == hub.repos[REPO].commits[commit][name].sha256
    assert not list(root.rglob("*.incomplete"))
    shard_gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith(".safetensors")]
    assert len(shard_gets) == 2 * len(shard_names(st))  # a header probe and the body, once each

    before = len(hub.requests)
    assert torch.allclose(logits(qopt.load(REPO, progress=False)), reference, atol=1e-5)
    assert len(hub.requests) - before == 1  # online, a cached model costs one API call (is main still there?)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time, after huggingface_hub was imported
    before = len(hub.requests)
    assert torch.allclose(logits(qopt.load(REPO, progress=False)), reference, atol=1e-5)
    assert len(hub.requests) == before  # offline: no request at all


def test_keep_download_false_streams_through_scratch_two_shards_at_most(hub, tmp_path, events, checkpoints):
    st, _, reference = checkpoints
    names = shard_names(st)
    from huggingface_hub import hf_hub_download

    cached = hf_hub_download(REPO, names[0], cache_dir=str(tmp_path / "cache"), endpoint=hub.url)
    on_disk = []
    events.on_event = lambda e: on_disk.append(sum(1 for p in (tmp_path / "tmp").rglob("*") if p.is_file()))
    model = qopt.load(REPO, keep_download=False, progress=False)
    assert torch.allclose(logits(model), reference, atol=1e-5)
    assert max(on_disk) <= 2 and not list((tmp_path / "tmp").iterdir())  # scratch removed at the end
    blobs = {p.name for p in (storage(tmp_path) / "blobs").iterdir()}
    commit = (storage(tmp_path) / "refs" / "main").read_text()
    shas = {n: hub.repos[REPO].commits[commit][n].sha256 for n in names}
    assert shas[names[0]] in blobs and Path(cached).exists()  # a blob already in the cache is read, never deleted
    assert not {shas[n] for n in names[1:]} & blobs  # streamed shards never entered the cache
    assert ("deleted", 0) not in events.seen and ("deleted", 1) in events.seen


def test_download_of_the_next_shard_overlaps_the_work_on_this_one(hub, events, monkeypatch):
    from qopt.loading import loader

    hub.faults.update({(REPO, name): Fault(bytes_per_second=400_000) for name in
                       [f.name for f in next(iter(hub.repos[REPO].commits.values())).values()]
                       if name.endswith(".safetensors")})
    quantize = loader.quantize_weight
    events.seen.append(("start", -1))

    def slow_quantize(*args, **kwargs):  # the work on a shard takes a while, as on a real model
        threading.Event().wait(0.02)
        return quantize(*args, **kwargs)

    monkeypatch.setattr(loader, "quantize_weight", slow_quantize)
    qopt.load(REPO, quantization="nf4", progress=False)
    order = {event: i for i, event in enumerate(events.seen)}
    shards = sorted(k for kind, k in events.seen if kind == "consume_end")
    assert len(shards) >= 3
    for k in shards[:-1]:
        assert order[("download_start", k + 1)] < order[("consume_end", k)]  # k+1 arrives while k is quantized
        assert order[("consume_start", k)] < order[("download_end", k + 1)]
    for k in shards[:-2]:
        assert order[("consume_end", k)] < order[("download_start", k + 2)]  # never more than one shard ahead


def test_single_file_repos_bin_and_safetensors_stream_too(hub, tmp_path, checkpoints, capsys):
    _, binary, reference = checkpoints
    hub.add_repo("facebook/opt-tiny", tree_files(binary))  # one pytorch_model.bin, as facebook/opt-125m
    model = qopt.load("facebook/opt-tiny", keep_download=False, progress=False)
    assert torch.allclose(logits(model), reference, atol=1e-5) and model.name_or_path == "facebook/opt-tiny"
    assert cli.main(["plan", "facebook/opt-tiny", "--bits", "4", "--context", "32"]) in (0, 1)
    out = capsys.readouterr().out
    assert "1 bin shard (" in out and "pickles have no header" in out
    model.save_pretrained(tmp_path / "one")  # one model.safetensors, no index
    assert shard_names(tmp_path / "one") == ["model.safetensors"]
    hub.add_repo("org/single", tree_files(tmp_path / "one"))
    assert torch.allclose(logits(qopt.load("org/single", progress=False)), reference, atol=1e-5)


def test_connection_cut_mid_shard_resumes_with_a_range(hub, big_checkpoint):
    folder, names, reference = big_checkpoint
    hub.add_repo("org/big", tree_files(folder))
    victim = max(names, key=lambda n: (folder / n).stat().st_size)
    hub.faults[("org/big", victim)] = Fault(cut_at=11 * 2**20, skip=1)  # the header probe passes, the body is cut
    model = qopt.load("org/big", progress=False)
    assert torch.allclose(logits(model), reference, atol=1e-5)
    ranges = [r.range for r in hub.requests if r.path.endswith(victim) and r.method == "GET"]
    assert ranges == ["bytes=0-99999", None, f"bytes={10 * 2**20}-"]  # resumed after the last whole 10 MiB written


@pytest.mark.parametrize("fault, message", [(Fault(truncate_to=30_000), r"truncated download \(30000 of \d+ bytes"),
                                            (Fault(corrupt=True), r"checksum mismatch \(sha256")])
def test_a_bad_shard_is_a_named_error_and_nothing_is_published(hub, tmp_path, checkpoints, fault, message):
    st, _, reference = checkpoints
    victim = shard_names(st)[1]
    hub.faults[(REPO, victim)] = fault
    with pytest.raises(DownloadError, match=rf"{REPO}@\w+: {victim}: {message}.*removed"):
        qopt.load(REPO, progress=False)
    root = storage(tmp_path)
    commit = (root / "refs" / "main").read_text()
    assert not (root / "snapshots" / commit / victim).exists()
    assert not list(root.rglob("*.incomplete")) and not list(root.rglob(f"{victim}*"))
    assert hub.repos[REPO].commits[commit][victim].sha256 not in {p.name for p in (root / "blobs").iterdir()}
    del hub.faults[(REPO, victim)]  # a healthy server: the next run completes from what was kept
    assert torch.allclose(logits(qopt.load(REPO, progress=False)), reference, atol=1e-5)


def test_a_disk_that_fills_up_during_a_download_publishes_nothing(hub, tmp_path, monkeypatch, checkpoints):
    from qopt.io import download

    st = checkpoints[0]
    write = download._Writer.write
    written = {"n": 0}

    def filling(self, chunk):
        written["n"] += len(chunk)
        if written["n"] > 200_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, chunk)

    monkeypatch.setattr(download._Writer, "write", filling)
    with pytest.raises(DownloadError, match=r"the disk filled up at .*blobs after .* nothing was published"):
        qopt.load(REPO, progress=False)
    root = storage(tmp_path)
    links = list((root / "snapshots").rglob("*.safetensors"))
    assert all(link.exists() for link in links) and len(links) < len(shard_names(st))
    assert not list(root.rglob("*.incomplete"))
    # before writing a byte: a shard that cannot fit is refused
    monkeypatch.setattr(download.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(DownloadError, match=r"needs .* which has 10 B free.*keep_download=False"):
        qopt.load(REPO, progress=False)


@pytest.mark.parametrize("repo, setup, error, message", [
    ("org/nothing", None, HubAccessError, r"org/nothing: no such model repo on http://127.0.0.1:\d+, or a private "
                                          r"one \(pass token= or set HF_TOKEN\).*local checkpoint folder"),
    ("org/gated", "gated", HubAccessError, r"org/gated: gated repo; accept its conditions at .*/org/gated"),
    ("org/llama", "llama", HubError, r"org/llama@\w+: not an OPT checkpoint \(config.json has model_type 'llama'\)"),
    ("org/readme", "readme", HubError, r"org/readme@\w+: not an OPT checkpoint \(the repo has no config.json\)"),
    (REPO, "unauthorized", HubAccessError, rf"{REPO}: unauthorized \(HTTP 401\)"),
])
def test_hub_errors_are_one_line_naming_the_repo(hub, checkpoints, repo, setup, error, message):
    files = tree_files(checkpoints[0])
    if setup == "gated":
        hub.add_repo(repo, files, gated=True, tokens={"secret"})
    elif setup == "llama":
        hub.add_repo(repo, {**files, "config.json": json.dumps({"model_type": "llama"}).encode()})
    elif setup == "readme":
        hub.add_repo(repo, {"README.md": b"hello"})
    elif setup == "unauthorized":
        hub.faults[(repo, "config.json")] = Fault(status=(401, ""))
        hub.add_repo("org/fresh", files)  # the fault hits the config download after the API call
    with pytest.raises(error, match=message) as caught:
        qopt.load(repo, progress=False)
    assert "\n" not in str(caught.value)


def test_revision_that_does_not_exist_and_a_token_read_at_call_time(hub, monkeypatch, checkpoints):
    with pytest.raises(HubError, match=rf"{REPO}: revision 'nope' does not exist"):
        qopt.load(REPO, revision="nope", progress=False)
    hub.add_repo("org/gated", tree_files(checkpoints[0]), gated=True, tokens={"secret"})
    with pytest.raises(HubAccessError, match="gated"):
        qopt.load("org/gated", progress=False)
    monkeypatch.setenv("HF_TOKEN", "secret")  # after huggingface_hub was imported: still used
    assert torch.allclose(logits(qopt.load("org/gated", progress=False)), checkpoints[2], atol=1e-5)


def test_plan_reads_metadata_only_and_sizes_both_modes(hub, capsys, checkpoints):
    st = checkpoints[0]
    sizes = [(st / n).stat().st_size for n in shard_names(st)]
    assert cli.main(["plan", REPO, "--bits", "4", "--context", "32", "--cpu", "1GiB"]) == 0
    kept = capsys.readouterr().out
    assert cli.main(["plan", REPO, "--bits", "4", "--context", "32", "--cpu", "1GiB", "--no-keep-download"]) == 0
    streamed = capsys.readouterr().out
    from qopt.utils import format_bytes

    assert f"download: {format_bytes(sum(sizes))} from {REPO}@" in kept and "float32" in kept
    assert f"peak disk during the load: {format_bytes(sum(sizes))} (the shards stay in the HF cache" in kept
    pair = max(a + b for a, b in zip(sizes, sizes[1:]))
    assert f"peak disk during the load: {format_bytes(pair)} (--no-keep-download" in streamed
    largest = format_bytes(max(sizes))
    assert re.search(r"peak host RAM during the load: .* anonymous, must fit \(weights kept in RAM .*\), plus up "
                     rf"to {re.escape(largest)} of the shard being read, memory-mapped", kept)
    assert "read from the shard headers by HTTP range" in kept
    shard_gets = [r for r in hub.requests if r.path.endswith(".safetensors") and r.method == "GET"]
    assert shard_gets and all(r.range and r.range.startswith("bytes=0-") and not r.range.endswith("-")
                              for r in shard_gets)  # headers by range, never a whole shard
    assert cli.main(["plan", "org/missing"]) == 2
    assert "org/missing: no such model repo" in capsys.readouterr().err


def test_cli_generate_and_quantize_by_hub_id(hub, tmp_path, capsys):
    assert cli.main(["generate", REPO, "The", "--max-new-tokens", "3", "--no-keep-download"]) == 0  # ids < 1000
    assert capsys.readouterr().out.startswith("The")
    out = tmp_path / "quantized"
    assert cli.main(["quantize", REPO, "--out", str(out), "--no-keep-download"]) == 0
    assert (out / "vocab.json").exists() and (out / "config.json").exists()  # tokenizer files from the cache
    capsys.readouterr()
    assert cli.main(["generate", "org/missing", "Hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qopt generate: error: org/missing: no such model repo")


def test_adapters_made_for_a_hub_id_match_their_base_by_id_or_cached_folder(hub, tmp_path):
    from qopt.errors import AdapterError
    from qopt.io.hub import cached_folder

    model = qopt.load(REPO, progress=False)
    qopt.add_lora(model, qopt.LoraConfig(r=2, target_modules=["q_proj"]))
    qopt.save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO
    folder = cached_folder(REPO)
    assert folder is not None and folder.parent.name == "snapshots"
    qopt.load_adapter(qopt.load(folder, progress=False), tmp_path / "adapter")  # same repo through its folder
    elsewhere = tmp_path / "another-model"
    shutil.copytree(folder, elsewhere)
    with pytest.raises(AdapterError, match="made for base model 'org/tiny-opt'"):
        qopt.load_adapter(qopt.load(elsewhere, progress=False), tmp_path / "adapter")


def test_finetune_by_hub_id_names_the_id_as_the_adapters_base(hub, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("the, to and of a in. " * 400)  # common words: token ids below the tiny vocabulary's 1000
    args = qopt.TrainingArguments(str(tmp_path / "adapter"), max_steps=1, batch_size=2, progress=False)
    qopt.finetune(REPO, data, args, qopt.LoraConfig(r=2, target_modules=["q_proj"]), block_size=16)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO


def test_calibration_reads_a_hub_model_from_the_cache(hub, tmp_path):
    model, report = qopt.calibrate(REPO, torch.randint(3, 1000, (2, 16)), qopt.CalibrationConfig(quantization="nf4"),
                                   progress=False)
    assert len(report.modules) == 12 and model.name_or_path == REPO  # 2 layers x 6 linears
    commit = (storage(tmp_path) / "refs" / "main").read_text()
    assert all(p.exists() for p in (storage(tmp_path) / "snapshots" / commit).iterdir())


def test_unknown_keyword_arguments_to_load_are_errors(checkpoints):
    with pytest.raises(ValueError, match=r"load\(\): unknown keyword argument 'quantisation'"):
        qopt.load(checkpoints[0], quantisation="nf4", progress=False)
    assert qopt.load(checkpoints[0], dropout=0.0, progress=False).config.dropout == 0.0  # a config field is fine


def test_ctrl_c_leaves_the_cache_consistent_and_the_next_run_resumes(hub, tmp_path, big_checkpoint):
    folder, names, reference = big_checkpoint
    hub.add_repo("org/big", tree_files(folder))
    victim = max(names, key=lambda n: (folder / n).stat().st_size)
    size = (folder / victim).stat().st_size
    hub.faults[("org/big", victim)] = Fault(bytes_per_second=8e6)
    sent = threading.Event()

    def trickle(repo, name, n):  # past 14 MiB the shard slows to about 1 MiB/s (the server's thread sleeps after
        if name == victim and n >= 14 * 2**20:  # each 256 KiB), so a busy machine has seconds, not a fraction of
            sent.set()  # one, to handle the signal before the download could end; nothing stalls
            time.sleep(0.25)

    hub.on_body = trickle
    # Ctrl-C as in a terminal even when this suite runs in the background, where the shell starts it with
    # SIGINT ignored and children inherit that
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "import qopt; qopt.load('org/big', progress=False)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(qopt.__file__).parent.parent)})
    assert sent.wait(120), "the child never got past 14 MiB of the shard"
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0 and "KeyboardInterrupt" in err, err[-3000:]
    hub.on_body = None
    assert child.returncode != 0 and "KeyboardInterrupt" in err, err[-3000:]
    root = storage(tmp_path, "org/big")
    commit = (root / "refs" / "main").read_text()
    sha = hub.repos["org/big"].commits[commit][victim].sha256
    partial = root / "blobs" / f"{sha}.incomplete"
    assert partial.exists() and 0 < partial.stat().st_size < size  # kept for the next run
    assert not (root / "blobs" / sha).exists() and not (root / "snapshots" / commit / victim).exists()
    assert all(link.exists() for link in (root / "snapshots" / commit).iterdir())  # every link is to a whole blob
    kept = partial.stat().st_size
    del hub.faults[("org/big", victim)]
    assert torch.allclose(logits(qopt.load("org/big", progress=False)), reference, atol=1e-5)
    assert [r.range for r in hub.requests if r.path.endswith(victim)][-1] == f"bytes={kept}-"  # resumed
    assert not list(root.rglob("*.incomplete"))
