"""scripts/download.py and scripts/prepare.sh: which files a download takes; the real Hugging Face
client (huggingface_hub) against a local server that answers as the Hub does (this machine may not
reach the Hub), for what a download does with tokens, a converted checkpoint, and Ctrl-C or SIGTERM
mid-file; offline, one error line."""
import errno
import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

import pytest

from checkpoint import InputError
from conftest import (ROOT, assert_fails_with_one_line, command, http_server, load_script, main_error,
                      run_script)


def test_download_chooses_one_copy_of_the_weights_and_the_files_conversion_needs():
    def choose(files):
        return sorted(load_script("download").choose_files(files))  # order is irrelevant
    tokenizer = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"]
    llama2 = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
              "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
              "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "config.json",
              "generation_config.json", "README.md", "LICENSE.txt", ".gitattributes", *tokenizer]
    assert choose(llama2) == sorted(["model-00001-of-00002.safetensors",
                                     "model-00002-of-00002.safetensors",
                                     "model.safetensors.index.json", "config.json",
                                     "generation_config.json", *tokenizer])
    bin_only = ["pytorch_model.bin", "training_args.bin", "config.json", "tokenizer.model",
                "README.md"]
    assert choose(bin_only) == sorted(["pytorch_model.bin", "config.json", "tokenizer.model"])
    mistral = ["consolidated.safetensors", "model-00001-of-00001.safetensors",
               "model.safetensors.index.json", "params.json", "tokenizer.model.v3", "config.json",
               "tokenizer.json"]
    assert choose(mistral) == sorted(["model-00001-of-00001.safetensors",
                                      "model.safetensors.index.json", "config.json",
                                      "tokenizer.json"])
    llama3_original = ["original/consolidated.00.pth", "original/params.json",
                       "original/tokenizer.model", "config.json", "tokenizer.json",
                       "tokenizer_config.json", "chat_template.jinja"]
    assert choose(llama3_original) == sorted(llama3_original)
    # Older Meta repos keep consolidated.00.pth at the top; the converter reads it there too.
    meta_top = ["consolidated.00.pth", "params.json", "tokenizer.model", "README.md"]
    assert choose(meta_top) == sorted(["consolidated.00.pth", "params.json", "tokenizer.model"])
    # Subfolder variants (onnx/, original/) never replace the top-level HF weights.
    assert choose(["model.safetensors", "onnx/model.safetensors", "original/consolidated.00.pth",
                   "config.json"]) == ["config.json", "model.safetensors"]
    with pytest.raises(InputError, match="no model weights"):
        choose(["README.md", "config.json"])
    with pytest.raises(InputError, match="no model weights"):  # Mistral's own naming only
        choose(["consolidated.safetensors", "params.json", "config.json"])


def test_download_offline_is_one_line(tmp_path):
    r = run_script("scripts/download.py", "--repo_id", "meta-llama/Llama-2-7b-chat-hf", "--out",
                   tmp_path / "hf", env={"HF_HUB_OFFLINE": "1"}, timeout=60)
    assert "offline" in assert_fails_with_one_line(r)
    assert not (tmp_path / "hf").exists()


def test_ctrl_c_during_a_download_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    download = load_script("download")
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(download, "download", interrupted)
    with pytest.raises(SystemExit) as exited:
        download.main(["--repo_id", "org/model", "--out", str(tmp_path / "hf")])
    assert exited.value.code == 130 and capsys.readouterr().err == ""


def test_download_into_a_file_or_a_link_to_nothing_is_refused_before_the_hub(tmp_path):
    check_out = load_script("download").check_folder_writable  # what main() asks before the hub
    (tmp_path / "file").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for name, what in (("file", "a file"), ("dangling", "a link to nothing")):
        with pytest.raises(InputError, match=f"--out {tmp_path / name} is {what}, not a folder"):
            check_out(tmp_path / name, "--out")


def test_a_network_error_of_any_http_library_is_explained_and_a_bug_is_not():
    explain = load_script("download").explain
    for library in ("httpx", "httpx2", "requests"):
        error = type("ConnectError", (Exception,), {"__module__": f"{library}._exceptions"})("refused")
        assert "cannot reach the Hugging Face Hub" in explain(error, "org/model")
    with pytest.raises(KeyError):
        explain(KeyError("a bug"), "org/model")


def test_a_gated_repo_is_named_as_gated_not_as_missing():
    import httpx
    from huggingface_hub import errors
    response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/api/models/org/model"))
    error = errors.GatedRepoError("Access to model org/model is restricted.", response=response)
    line = load_script("download").explain(error, "org/model")
    assert "org/model is gated" in line and "accept its license" in line and "HF_TOKEN" in line


def test_a_disk_that_fills_during_a_download_is_explained_in_one_line():
    error = OSError(errno.ENOSPC, "No space left on device")
    assert load_script("download").explain(error, "org/model") == "disk full while downloading org/model"


def test_download_goes_by_default_into_the_hf_folder_of_the_repos_checkpoint(tmp_path, monkeypatch, capsys):
    download = load_script("download")
    into = []
    monkeypatch.setattr(download, "download", lambda repo_id, out, token: into.append(out))
    monkeypatch.chdir(tmp_path)
    download.main(["--repo_id", "org/model"])
    assert into == [os.path.join("checkpoints", "org", "model", "hf")]
    assert capsys.readouterr().out == f"done: {into[0]}\n"


def test_prepare_stops_when_download_fails():
    r = subprocess.run(["bash", str(ROOT / "scripts/prepare.sh"), "no-such-org/no-such-model"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable})
    # set -e: the converter never ran after the failed download
    assert "offline" in assert_fails_with_one_line(r)
    usage = subprocess.run(["bash", str(ROOT / "scripts/prepare.sh")], capture_output=True,
                           text=True, timeout=60)
    assert_fails_with_one_line(usage)
    assert "bash scripts/prepare.sh REPO_ID" in usage.stderr


# ---- against a local server that answers as the Hub does ------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_valid"  # the one token the server takes; no token is taken too (a public repo)


class LocalHub(http.server.BaseHTTPRequestHandler):
    """The Hub's API as download.py's huggingface_hub calls reach it, over a folder of repos
    (root/ORG/NAME/files): a repo's file list and revision, each file's HEAD and GET. Files stream
    at `rate` bytes a second (0: at once). A token other than TOKEN is refused with 401, as the Hub
    refuses an invalid one."""
    protocol_version = "HTTP/1.1"
    root: Path
    rate = 0

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: bytes, headers: dict, stream: bool = False):
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        step = 1 << 16 if self.rate else len(body)
        for i in range(0, len(body), step):
            try:
                self.wfile.write(body[i:i + step])
            except OSError:  # the client is gone
                return
            if self.rate:
                time.sleep(step / self.rate)

    def json(self, status: int, data, headers: dict = {}):
        self.reply(status, json.dumps(data).encode(), {"Content-Type": "application/json", **headers})

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        token = self.headers.get("Authorization")
        if token not in (None, f"Bearer {TOKEN}"):
            message = "Invalid credentials in Authorization header"
            return self.json(401, {"error": message}, {"X-Error-Message": message})
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if listing := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(tree|revision)/[^/]+", path):
            repo = self.root / listing[1]
            names = sorted(str(f.relative_to(repo)) for f in repo.rglob("*") if f.is_file())
            if listing[2] == "tree":
                return self.json(200, [{"type": "file", "path": n, "size": (repo / n).stat().st_size,
                                        "oid": COMMIT} for n in names])
            return self.json(200, {"id": listing[1], "sha": COMMIT, "siblings": [{"rfilename": n} for n in names]})
        if file := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
            data = (self.root / file[1] / file[2]).read_bytes()
            return self.reply(200, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                          "X-Repo-Commit": COMMIT})
        self.json(404, {"error": f"no {path}"}, {"X-Error-Code": "EntryNotFound"})


@contextmanager
def local_hub(root: Path, rate: float = 0):
    """LocalHub on a free port of 127.0.0.1; yields the environment that points the client at it."""
    with http_server(type("Hub", (LocalHub,), {"root": root, "rate": rate})) as port:
        # no token of this machine's (HF_TOKEN, or one `hf auth login` saved under HF_HOME)
        yield {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_DOWNLOAD_TIMEOUT": "30", "HF_TOKEN": "",
               "HF_HOME": str(root.parent / "hf-home")}


@pytest.fixture
def repos(tmp_path) -> Path:
    """A repo org/tiny of the files an HF model repo has (the weights a few bytes), and org/big,
    whose 64 MB of weights take a while at a slow rate."""
    tiny = tmp_path / "repos" / "org" / "tiny"
    tiny.mkdir(parents=True)
    for name, text in (("config.json", '{"model_type": "llama"}'), ("tokenizer.json", "{}"),
                       ("model.safetensors", "weights"), ("README.md", "# a model card")):
        (tiny / name).write_text(text)
    big = tmp_path / "repos" / "org" / "big"
    big.mkdir()
    (big / "config.json").write_text('{"model_type": "llama"}')
    (big / "model.safetensors").write_bytes(os.urandom(64 << 20))
    return tmp_path / "repos"


def test_download_takes_the_files_conversion_needs_from_the_hub(repos, tmp_path):
    """Through the real client: the weights, config and tokenizer; not the model card."""
    with local_hub(repos) as hub:
        r = run_script("scripts/download.py", "--repo_id", "org/tiny", "--out", tmp_path / "hf", env=hub)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir() if p.is_file()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert (tmp_path / "hf" / "model.safetensors").read_text() == "weights"


@pytest.mark.parametrize("token, words", [
    ("", []),  # an empty HF_TOKEN is no token: the public repo downloads
    (TOKEN, []),
    ("hf_expired", ["error: the Hub refused the access token", "Invalid credentials"]),
], ids=["empty", "valid", "refused"])
def test_hf_token_empty_is_no_token_and_one_the_hub_refuses_is_named(repos, tmp_path, token, words):
    with local_hub(repos) as hub:
        r = run_script("scripts/download.py", "--repo_id", "org/tiny", "--out", tmp_path / "hf",
                       env={**hub, "HF_TOKEN": token})
    if words:
        assert_fails_with_one_line(r, *words)
    else:
        assert r.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), r.stderr[-3000:]


def test_download_into_a_converted_checkpoint_is_refused_and_leaves_it_alone(tmp_path, capsys):
    """The HF files would replace its config.json and tokenizer, and the checkpoint would no longer
    load."""
    from test_generate import save_tiny_checkpoint
    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    main_error(load_script("download").main, ["--repo_id", "org/tiny", "--out", folder], capsys,
               "holds a converted checkpoint")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_download_stopped_mid_file_ends_at_once_and_leaves_no_partial_file(repos, tmp_path, signum):
    """64 MB at 4 MB/s: stopped a few MB in, the script exits within seconds (the hub's threads would
    first finish the file: ~15 s), with 128 + the signal, and no partial file of its own stays behind (the
    next run would not resume it); another run's stays. What it said it downloads was printed before."""
    out = tmp_path / "hf"
    another_runs = out / ".cache" / "huggingface" / "download" / "other.incomplete"
    another_runs.parent.mkdir(parents=True)
    another_runs.write_bytes(b"x")
    with local_hub(repos, rate=4 << 20) as hub:
        argv, env = command(["scripts/download.py", "--repo_id", "org/big", "--out", out], hub)
        # as a shell starts it in the foreground: Ctrl-C's signal not ignored
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 120
            while not any(p.stat().st_size > 1 << 20 for p in out.glob(".cache/**/*.incomplete")):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "no partial file"
                time.sleep(0.1)
            process.send_signal(signum)
            stopped = time.monotonic()
            said, err = process.communicate(timeout=60)
            took = time.monotonic() - stopped
        finally:
            process.kill()
    assert process.returncode == 128 + signum, err.decode()[-2000:]
    assert took < 5, f"the download ran on for {took:.1f} s after the signal"
    assert list(out.glob("**/*.incomplete")) == [another_runs] and not (out / "model.safetensors").exists()
    assert b"of org/big into" in said, said


def test_stopping_at_once_gives_the_handlers_back_and_leaves_an_ignored_signal_ignored(tmp_path):
    """Its handlers hold only while the download runs, also when the download fails; and Ctrl-C ignored (a
    background job's) stays ignored."""
    stopping_at_once = load_script("download").stopping_at_once
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(OSError):
        with stopping_at_once(tmp_path):
            assert signal.getsignal(signal.SIGINT) not in before
            raise OSError("the download failed")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stopping_at_once(tmp_path):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[0])
