"""`postern plugin new` for each language: the project it makes builds with the command it
prints and passes its own `./test` (`postern plugin test` with expectations) as made."""

import os
import subprocess

import pytest

from conftest import ROOT, postern_bin

VENV = ROOT / "tests" / ".venv" / "bin"
JS_MODULES = ROOT / "examples" / "plugins" / "js-filter" / "node_modules"


def make(tmp_path, name, lang, hooks):
    out = subprocess.run([postern_bin(), "plugin", "new", name, "--lang", lang, "--hooks", hooks,
                          "--dir", str(tmp_path / name)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"made {tmp_path / name} ({lang} plugin, hooks {hooks})" in out.stdout
    return tmp_path / name


def run(cmd, cwd, env=None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, shell=isinstance(cmd, str),
                         env={**os.environ, "POSTERN": str(postern_bin()), **(env or {})})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_a_rust_project_builds_and_passes_its_test(tmp_path):
    project = make(tmp_path, "made-in-rust", "rust", "login,mail-from,rcpt,data,queued,deliver")
    # The shipped plugins' target folder: the SDK and wit-bindgen are compiled there already.
    env = {"CARGO_TARGET_DIR": str(ROOT / "plugins" / "target")}
    run("cargo build --release --target wasm32-wasip2", project, env)
    out = run(["./test"], project, env)
    assert "login      pass" in out
    assert "data       +X-MadeInRust: seen" in out
    assert "queued     deliver" in out
    assert out.rstrip().endswith("all 5 expectations met"), out


def test_a_python_project_builds_and_passes_its_test(tmp_path):
    project = make(tmp_path, "made-in-python", "python", "helo,rcpt,data,queued")
    run([str(VENV / "componentize-py"), "-d", "wit", "-w", "made-in-python", "componentize", "app",
         "-o", "made_in_python.wasm"], project)
    out = run(["./test"], project)
    assert "data       +X-MadeInPython: seen" in out
    assert "queued     deliver" in out
    assert out.rstrip().endswith("all 4 expectations met"), out


def test_a_javascript_project_builds_and_passes_its_test(tmp_path):
    if not JS_MODULES.is_dir():
        pytest.fail("examples/plugins/build installs componentize-js; run it first")
    project = make(tmp_path, "made-in-js", "js", "connect,rcpt,data,queued")
    # The same componentize-js the JavaScript example installed (package.json pins it alike).
    (project / "node_modules").symlink_to(JS_MODULES)
    run("npm run -s build", project)
    out = run(["./test"], project)
    assert "connect    pass" in out
    assert "data       +X-MadeInJs: seen" in out
    assert "queued     deliver" in out
    assert out.rstrip().endswith("all 4 expectations met"), out


def test_names_and_hooks_are_checked(tmp_path):
    for args, message in [(["Bad_Name", "--lang", "rust"], "lower-case letters"),
                          (["fine", "--lang", "rust", "--hooks", "rcpt,nope"], "unknown hook"),
                          (["fine", "--lang", "cobol"], "invalid value")]:
        out = subprocess.run([postern_bin(), "plugin", "new", *args, "--dir", str(tmp_path / "x")],
                             capture_output=True, text=True)
        assert out.returncode != 0 and message in out.stderr, out.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    out = subprocess.run([postern_bin(), "plugin", "new", "full", "--lang", "rust", "--dir",
                          str(tmp_path / "full")], capture_output=True, text=True)
    assert out.returncode != 0 and "not empty" in out.stderr
    assert (tmp_path / "full" / "keep").read_text() == "mine"
