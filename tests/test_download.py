"""Tests for download.sh against a local HTTP server holding a tiny fake Llama-2 download.

The server stands in for Meta's signed download URL: the script gets
``http://127.0.0.1:PORT/*?Policy=x&Signature=y`` and must replace the ``*`` with each file path.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "download.sh"
BASH = shutil.which("bash")
WGET = shutil.which("wget")
if BASH is None or WGET is None:
    pytest.skip("download.sh tests need bash and wget installed", allow_module_level=True)

QUERY = "?Policy=x&Signature=y"
TOKENIZER_FILES = ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"]
# model name -> (folder, number of shards), as download.sh must lay them out.
MODELS = {
    "7B": ("llama-2-7b", 1),
    "13B": ("llama-2-13b", 2),
    "70B": ("llama-2-70b", 8),
    "7B-chat": ("llama-2-7b-chat", 1),
    "13B-chat": ("llama-2-13b-chat", 2),
    "70B-chat": ("llama-2-70b-chat", 8),
}
# Tools download.sh calls; the restricted PATH of the macOS tests holds only these (+ md5).
TOOLS = ["bash", "wget", "mkdir", "grep", "tr"]


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_checklist(folder: Path, name: str, files: list) -> None:
    lines = [f"{md5_hex((folder / f).read_bytes())}  {f}\n" for f in files]
    (folder / name).write_text("".join(lines))


def make_source(root: Path, models=MODELS) -> dict:
    """Writes a fake download (a few bytes per file) under root; returns {relative path: bytes}."""
    root.mkdir(parents=True, exist_ok=True)
    for f in ["LICENSE", "USE_POLICY.md", "tokenizer.model"]:
        (root / f).write_bytes(f"fake {f}\n".encode())
    write_checklist(root, "tokenizer_checklist.chk", ["tokenizer.model"])
    for name in models:
        folder, shards = MODELS[name]
        d = root / folder
        d.mkdir()
        files = [f"consolidated.{i:02d}.pth" for i in range(shards)] + ["params.json"]
        for f in files:
            (d / f).write_bytes(f"fake {folder}/{f}\n".encode())
        write_checklist(d, "checklist.chk", files)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class QuietRangeHandler(SimpleHTTPRequestHandler):
    """Static files, no logging, records requests, and honours "Range: bytes=N-" as a CDN
    does (SimpleHTTPRequestHandler ignores Range), so that wget --continue can resume."""

    timeout = 10  # bound every connection

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        path = Path(self.translate_path(self.path))  # translate_path drops the query string
        if not (match and path.is_file()):
            return super().do_GET()
        data, start = path.read_bytes(), int(match.group(1))
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def serve():
    """serve(directory) starts a server for directory and returns (url with '*', requests list)."""
    running = []

    def start(directory: Path):
        handler = lambda *a, **kw: QuietRangeHandler(*a, directory=str(directory), **kw)  # noqa: E731
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.requests = []
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        running.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/*{QUERY}", server.requests

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def clean_env(path=None) -> dict:
    # No proxy variables: wget must talk straight to 127.0.0.1.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    if path is not None:
        env["PATH"] = str(path)
    return env


def run_download(target: Path, url: str, models: str, env=None):
    return subprocess.run(
        [BASH, str(SCRIPT), str(target)],
        input=f"{url}\n{models}\n",
        capture_output=True,
        text=True,
        timeout=600,
        env=env if env is not None else clean_env(),
    )


def restricted_bin(tmp_path: Path, with_md5: bool) -> Path:
    """A bin dir with only the tools download.sh needs: no md5sum, and a fake macOS `md5` if asked."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in TOOLS:
        (bindir / tool).symlink_to(shutil.which(tool))
    if with_md5:
        md5 = bindir / "md5"
        md5.write_text(
            f"#!{sys.executable}\n"
            "import hashlib, sys\n"
            "# macOS `md5 -q FILE` prints only the hex digest.\n"
            "assert sys.argv[1] == '-q', sys.argv\n"
            "print(hashlib.md5(open(sys.argv[2], 'rb').read()).hexdigest())\n"
        )
        md5.chmod(0o755)
    assert shutil.which("md5sum", path=str(bindir)) is None
    return bindir


@pytest.fixture(params=["md5sum", "md5"])
def verifier_env(request, tmp_path):
    """Environment for running the script with GNU md5sum (Linux) or only `md5` (macOS)."""
    if request.param == "md5sum":
        if shutil.which("md5sum") is None:
            pytest.skip("md5sum is not installed")
        return clean_env()
    return clean_env(restricted_bin(tmp_path, with_md5=True))


def assert_same_files(source: dict, target: Path, prefixes):
    for rel, data in source.items():
        if rel in TOKENIZER_FILES or rel.startswith(prefixes):
            assert (target / rel).read_bytes() == data, rel


def test_downloads_requested_models_and_verifies_checksums(tmp_path, serve, verifier_env):
    source = make_source(tmp_path / "server")
    url, requests = serve(tmp_path / "server")
    target = tmp_path / "target"

    result = run_download(target, url, " 7B , 13B", env=verifier_env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_files(source, target, ("llama-2-7b/", "llama-2-13b/"))
    assert sorted(p.name for p in target.iterdir()) == sorted(TOKENIZER_FILES + ["llama-2-7b", "llama-2-13b"])
    assert sorted(p.name for p in (target / "llama-2-13b").iterdir()) == [
        "checklist.chk",
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
    ]
    assert "Checksums OK" in result.stdout
    # The '*' was replaced by the path and the signed query string reached the server intact.
    assert requests and all(path.endswith(QUERY) for path, _ in requests)
    assert "/llama-2-13b/consolidated.01.pth" + QUERY in [path for path, _ in requests]


@pytest.mark.parametrize("corrupt", ["llama-2-13b/consolidated.01.pth", "tokenizer.model"])
def test_corrupt_shard_stops_with_nonzero_exit_naming_the_file(tmp_path, serve, verifier_env, corrupt):
    make_source(tmp_path / "server")
    (tmp_path / "server" / corrupt).write_bytes(b"not what the checklist says\n")
    url, _ = serve(tmp_path / "server")

    result = run_download(tmp_path / "target", url, "7B,13B", env=verifier_env)

    assert result.returncode != 0
    assert "checksum verification failed" in result.stderr
    assert Path(corrupt).name in result.stderr


def test_file_listed_in_checklist_but_missing_stops_naming_it(tmp_path, serve, verifier_env):
    make_source(tmp_path / "server", models=["7B"])
    checklist = tmp_path / "server" / "llama-2-7b" / "checklist.chk"
    checklist.write_text(checklist.read_text() + f"{md5_hex(b'x')}  consolidated.01.pth\n")
    url, _ = serve(tmp_path / "server")

    result = run_download(tmp_path / "target", url, "7B", env=verifier_env)

    assert result.returncode != 0
    assert "consolidated.01.pth" in result.stderr


def test_empty_checklist_does_not_count_as_verified(tmp_path, serve, verifier_env):
    make_source(tmp_path / "server", models=["7B"])
    (tmp_path / "server" / "llama-2-7b" / "checklist.chk").write_text("")
    url, _ = serve(tmp_path / "server")

    result = run_download(tmp_path / "target", url, "7B", env=verifier_env)

    assert result.returncode != 0
    assert "checksum verification failed" in result.stderr


def test_verification_works_without_md5sum_as_on_macos(tmp_path, serve):
    source = make_source(tmp_path / "server", models=["7B"])
    url, _ = serve(tmp_path / "server")
    env = clean_env(restricted_bin(tmp_path, with_md5=True))

    good = run_download(tmp_path / "good", url, "7B", env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert_same_files(source, tmp_path / "good", ("llama-2-7b/",))

    # Same PATH, corrupted shard: the md5 fallback must really compare the hashes.
    (tmp_path / "server" / "llama-2-7b" / "consolidated.00.pth").write_bytes(b"corrupt\n")
    bad = run_download(tmp_path / "bad", url, "7B", env=env)
    assert bad.returncode != 0
    assert "consolidated.00.pth" in bad.stderr


def test_without_md5sum_or_md5_stops_asking_to_install_md5sum(tmp_path, serve):
    make_source(tmp_path / "server", models=["7B"])
    url, _ = serve(tmp_path / "server")
    env = clean_env(restricted_bin(tmp_path, with_md5=False))

    result = run_download(tmp_path / "target", url, "7B", env=env)

    assert result.returncode != 0
    assert "md5sum" in result.stderr and "coreutils" in result.stderr


def test_unknown_model_name_fails_before_downloading(tmp_path, serve):
    make_source(tmp_path / "server")
    url, requests = serve(tmp_path / "server")

    result = run_download(tmp_path / "target", url, "7B,8B")

    assert result.returncode == 1
    assert "unknown model '8B'" in result.stderr
    assert requests == []


def test_url_without_star_fails_with_clear_message(tmp_path, serve):
    make_source(tmp_path / "server")
    url, requests = serve(tmp_path / "server")

    result = run_download(tmp_path / "target", url.replace("*", "tokenizer.model"), "7B")

    assert result.returncode == 1
    assert "must contain '*' where the file path goes" in result.stderr
    assert requests == []


def test_empty_model_list_downloads_all_six_models(tmp_path, serve):
    source = make_source(tmp_path / "server")
    url, _ = serve(tmp_path / "server")
    target = tmp_path / "target"

    result = run_download(target, url, "")

    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_files(source, target, tuple(f"{folder}/" for folder, _ in MODELS.values()))
    for folder, shards in MODELS.values():
        assert len(list((target / folder).glob("consolidated.*.pth"))) == shards, folder


def test_file_missing_on_server_stops_naming_the_file(tmp_path, serve):
    make_source(tmp_path / "server", models=[])  # tokenizer files only
    url, _ = serve(tmp_path / "server")

    result = run_download(tmp_path / "target", url, "7B")

    assert result.returncode != 0
    assert "failed to download llama-2-7b/consolidated.00.pth" in result.stderr


def test_partial_file_is_resumed_and_rerun_of_complete_download_succeeds(tmp_path, serve):
    source = make_source(tmp_path / "server", models=["7B"])
    url, requests = serve(tmp_path / "server")
    target = tmp_path / "target"
    shard = "llama-2-7b/consolidated.00.pth"
    (target / "llama-2-7b").mkdir(parents=True)
    (target / shard).write_bytes(source[shard][:5])  # an interrupted download

    first = run_download(target, url, "7B")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (target / shard).read_bytes() == source[shard]
    assert (f"/{shard}{QUERY}", "bytes=5-") in requests  # only the rest was fetched

    second = run_download(target, url, "7B")
    assert second.returncode == 0, second.stdout + second.stderr
    assert_same_files(source, target, ("llama-2-7b/",))
