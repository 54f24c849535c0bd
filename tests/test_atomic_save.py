"""save_pretrained killed at random moments always leaves one complete, loadable copy of the checkpoint.

A server subprocess imports qopt once and forks one child per save, so each SIGKILL lands inside a real
`save_pretrained` without paying the import again. The child is reaped only after the kill, so its pid is
never reused by an unrelated process while the test may still signal it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qopt
from qopt.io.checkpoint import load_state_dict
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
# ~9M parameters (36 MB in fp32): one save takes about 0.1-0.2 s here
CONFIG = dict(vocab_size=16384, hidden_size=256, num_hidden_layers=6, ffn_dim=1024, num_attention_heads=4,
              max_position_embeddings=256, dropout=0.0)
SHARDED = "2MB"
SERVER = r"""
import json, os, sys, time, traceback
import torch
torch.set_num_threads(1)
from qopt import OPTConfig, OPTForCausalLM
models = []
for seed in (0, 1):
    torch.manual_seed(seed)
    models.append(OPTForCausalLM(OPTConfig(**json.loads(sys.argv[1]))).eval())
print("ready", flush=True)
for line in sys.stdin:
    which, folder, shard = line.split()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            models[int(which)].save_pretrained(folder, max_shard_size=shard)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    print("pid", pid, flush=True)
    sys.stdin.readline()  # "reap": until then a dead child stays a zombie and its pid cannot be reused
    _, status = os.waitpid(pid, 0)
    print("exit", os.waitstatus_to_exitcode(status), time.perf_counter() - start, flush=True)
"""


class SaveServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(CONFIG)], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._read() == ["ready"]

    def _read(self) -> list[str]:
        line = self.proc.stdout.readline()
        assert line, f"save server died (exit code {self.proc.poll()})"
        return line.split()

    def save(self, which: int, folder: Path, shard: str, kill_after: float | None = None,
             kill_when_staging: bool = False) -> tuple[int, float]:
        """Save model `which` into `folder`, maybe SIGKILL it; returns (exit code, seconds), -9 if killed."""
        self.proc.stdin.write(f"{which} {folder} {shard}\n")
        self.proc.stdin.flush()
        tag, pid = self._read()
        assert tag == "pid"
        pid = int(pid)
        if kill_when_staging:
            staging = folder.with_name(f".{folder.name}.tmp-{pid}")
            deadline = time.monotonic() + 30
            while not staging.exists() and time.monotonic() < deadline:
                time.sleep(0.0005)
            assert staging.exists(), "the save never created its staging folder"
        elif kill_after is not None:
            time.sleep(kill_after)
        if kill_when_staging or kill_after is not None:
            os.kill(pid, signal.SIGKILL)  # still our unreaped child: at worst a zombie
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        tag, code, seconds = self._read()
        assert tag == "exit"
        assert int(code) in (0, -signal.SIGKILL), f"save failed with exit code {code}"
        return int(code), float(seconds)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    srv = SaveServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def references(server, tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    """What an uninterrupted save of each model writes, read back from disk."""
    root = tmp_path_factory.mktemp("refs")
    states = []
    for which in (0, 1):
        assert server.save(which, root / f"m{which}", "2GB")[0] == 0
        states.append(load_state_dict(root / f"m{which}"))
    assert not all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    return states


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def which_copy(folder: Path, references: list[dict[str, torch.Tensor]]) -> int:
    """Index of the reference the folder holds exactly; fails on anything partial or mixed."""
    assert (folder / "README.md").read_text() == "my notes\n", "a file of the old folder was lost"
    state = load_state_dict(folder)
    qopt.OPTConfig.from_pretrained(folder)
    matches = [i for i, ref in enumerate(references) if same(state, ref)]
    assert len(matches) == 1, "the checkpoint is neither the old copy nor the new one"
    return matches[0]


def kill_moments(seconds: float) -> list[dict]:
    """Random moments spread over a whole save (and just after it), plus kills right as staging begins."""
    rng = random.Random(8)
    fractions = [rng.uniform(lo, lo + 0.15) for lo in (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)]
    return [dict(kill_after=f * seconds) for f in fractions] + [dict(kill_when_staging=True)] * 2


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.parent.glob(f".{folder.name}.*"))


def test_kill_during_first_save_into_an_existing_folder(server, references, tmp_path):
    """The folder already holds other files; a killed save leaves it as it was or fully written."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("my notes\n")
    _, seconds = server.save(0, folder, "2GB")
    outcomes = []
    for moment in kill_moments(seconds):
        shutil.rmtree(folder)
        folder.mkdir()
        (folder / "README.md").write_text("my notes\n")
        code, _ = server.save(0, folder, "2GB", **moment)
        names = sorted(p.name for p in folder.iterdir())
        if names == ["README.md"]:
            outcomes.append("old")
            assert code == -signal.SIGKILL
        else:
            assert which_copy(folder, references) == 0
            outcomes.append("new")
    assert outcomes.count("old") >= 3, f"too few kills landed inside the save: {outcomes}"
    assert leftovers(folder), "no kill left a staging folder behind"
    assert server.save(1, folder, "2GB")[0] == 0  # leftover staging folders do not disturb the next save
    assert which_copy(folder, references) == 1


def test_kill_while_overwriting_a_sharded_checkpoint(server, references, tmp_path):
    folder = tmp_path / "model"
    assert server.save(0, folder, SHARDED)[0] == 0
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 5
    (folder / "README.md").write_text("my notes\n")
    current = 0
    _, seconds = server.save(1, folder, SHARDED)
    current = which_copy(folder, references)
    killed_mid_save = 0
    for moment in kill_moments(seconds):
        code, _ = server.save(1 - current, folder, SHARDED, **moment)
        now = which_copy(folder, references)
        killed_mid_save += code == -signal.SIGKILL and now == current
        current = now
    assert killed_mid_save >= 3, "too few kills landed inside the save"
    stale = leftovers(folder)
    assert stale, "no kill left a staging folder behind"
    assert server.save(1 - current, folder, SHARDED)[0] == 0
    assert which_copy(folder, references) == 1 - current
    model = qopt.load(folder, progress=False)
    assert same({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
                references[1 - current])


@pytest.mark.parametrize("first, second", [("60KB", "2GB"), ("2GB", "60KB"), ("60KB", "100KB")])
def test_overwriting_with_another_shard_layout_leaves_no_stale_weights(tmp_path, first, second):
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(qopt.OPTForCausalLM(qopt.OPTConfig(**TINY)).eval())
    folder = tmp_path / "model"
    models[0].save_pretrained(folder, max_shard_size=first)
    (folder / "README.md").write_text("my notes\n")
    models[1].save_pretrained(folder, max_shard_size=second)
    fresh = tmp_path / "fresh"
    models[1].save_pretrained(fresh, max_shard_size=second)
    assert sorted(p.name for p in folder.iterdir()) == sorted([p.name for p in fresh.iterdir()] + ["README.md"])
    assert same(load_state_dict(folder), load_state_dict(fresh))


def run_quantize(source: Path, out: Path, quant_type: str, kill_after: float | None = None) -> tuple[int, float]:
    """`python -m qopt quantize --force` into `out`; with `kill_after`, SIGKILL that long after its staging folder
    appears. Returns (exit code, seconds the staging folder existed: the write phase, when not killed)."""
    proc = subprocess.Popen([sys.executable, "-m", "qopt", "quantize", str(source), "--out", str(out),
                             "--quant-type", quant_type, "--max-shard-size", "2MB", "--force"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    staging = out.with_name(f".{out.name}.tmp-{proc.pid}")
    while not staging.exists() and proc.poll() is None:
        time.sleep(0.0005)
    began = time.monotonic()
    if kill_after is not None:
        time.sleep(kill_after)
        proc.kill()
    while staging.exists() and proc.poll() is None:
        time.sleep(0.0005)
    staged = time.monotonic() - began
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), err
    return proc.returncode, staged


def test_kill_of_qopt_quantize_mid_write_leaves_the_previous_quantized_copy(tmp_path):
    source, out = tmp_path / "float", tmp_path / "quantized"
    torch.manual_seed(0)
    qopt.OPTForCausalLM(qopt.OPTConfig(**CONFIG)).eval().save_pretrained(source)
    assert run_quantize(source, out, "nf4")[0] == 0
    (out / "README.md").write_text("my notes\n")
    nf4 = load_state_dict(out)
    assert run_quantize(source, tmp_path / "fp4", "fp4")[0] == 0
    fp4 = load_state_dict(tmp_path / "fp4")
    _, seconds = run_quantize(source, tmp_path / "fp4", "fp4")  # how long the write phase lasts
    outcomes = []
    for fraction in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9):
        code, _ = run_quantize(source, out, "fp4", kill_after=fraction * seconds)
        state = load_state_dict(out)
        assert same(state, nf4) or same(state, fp4), "the folder holds neither the old nor the new checkpoint"
        assert (out / "README.md").read_text() == "my notes\n"
        outcomes.append("old" if same(state, nf4) else "new")
        assert qopt.OPTConfig.from_pretrained(out).quantization_config["bnb_4bit_quant_type"] == \
            ("nf4" if outcomes[-1] == "old" else "fp4")
        if outcomes[-1] == "new":
            assert run_quantize(source, out, "nf4")[0] == 0  # back to the old copy for the next kill
            (out / "README.md").write_text("my notes\n")
    assert outcomes.count("old") >= 2, f"too few kills landed inside the write: {outcomes}"
    assert run_quantize(source, out, "fp4")[0] == 0
    assert same(load_state_dict(out), fp4) and not leftovers(out)
    model = qopt.load(out, progress=False)
    assert type(model.model.decoder.layers[0].fc1).__name__ == "Linear4bit"
