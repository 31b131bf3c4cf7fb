"""Download the files of a Hugging Face model repo that conversion needs, and nothing else.

    python scripts/download.py --repo_id meta-llama/Llama-2-7b-chat-hf
        # -> checkpoints/meta-llama/Llama-2-7b-chat-hf/hf

Gated repos (Llama) need an access token: set HF_TOKEN or run `hf auth login` (huggingface_hub
before 0.34: `huggingface-cli login`) first.
scripts/convert_hf_checkpoint.py then turns the raw files into a gpt-blitz checkpoint one folder
up.
"""
import errno
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from checkpoint import (TOKENIZER_FILES, ArgumentParser, InputError,  # noqa: E402
                        check_folder_writable, one_line, read_checkpoint, script_exits)


def choose_files(repo_files: list[str]) -> list[str]:
    """The repo files to fetch, given every file name in the repo.

    One copy of the weights: safetensors when the repo has them (faster and safe to load), else
    PyTorch .bin shards, else Meta's original consolidated*.pth (some Llama-3 repos ship only
    those).
    Only top-level files count as the HF-format model: subfolders hold other variants (original/,
    onnx/, ...).
    """
    top = [f for f in repo_files if "/" not in f]
    # Mistral repos ship the same weights twice: HF shards and a consolidated.safetensors in
    # Mistral's own naming, which the converter does not read. Take the HF ones.
    safetensors = [f for f in top
                   if f.endswith(".safetensors") and not f.startswith("consolidated")]
    bins = [f for f in top if f.endswith(".bin") and f.startswith(("pytorch_model", "model"))]
    # Meta's consolidated.*.pth: under original/ (Llama-3 repos) or at the top (older Meta repos).
    original = [f for f in repo_files
                if f.count("/") <= 1 and f.startswith(("original/", "consolidated"))
                and PurePosixPath(f).name.startswith("consolidated") and f.endswith(".pth")]
    if safetensors:
        weights = safetensors + [f for f in top if f.endswith(".safetensors.index.json")]
    elif bins:
        weights = bins + [f for f in top if f.endswith(".bin.index.json")]
    elif original:
        # Meta's format: the checkpoint shards, their params.json and the tokenizer that goes with
        # them.
        folder = PurePosixPath(original[0]).parent  # PurePosixPath(".") / name is just name
        extras = [str(folder / name) for name in ("params.json", "tokenizer.model")]
        weights = original + [f for f in extras if f in repo_files]
    else:
        raise InputError("the repo has no model weights (*.safetensors, pytorch_model*.bin or "
                         "original/consolidated*.pth)")
    extras = ("config.json",) + TOKENIZER_FILES
    return sorted(weights) + [f for f in extras if f in top and f not in weights]


def download(repo_id: str, out: str, token) -> list[str]:
    from huggingface_hub import HfApi, snapshot_download
    try:
        files = choose_files(HfApi(token=token).list_repo_files(repo_id))
    except InputError as e:
        raise InputError(f"{repo_id}: {e}") from None
    # flushed now: a stop ends the process without flushing its output
    print(f"downloading {len(files)} files of {repo_id} into {out}:", " ".join(files), flush=True)
    # allow_patterns are fnmatch patterns; exact names match only themselves.
    snapshot_download(repo_id, allow_patterns=files, local_dir=out, token=token)
    return files


def explain(e: Exception, repo_id: str) -> str:
    """One line saying what went wrong, for the errors a download realistically hits."""
    from huggingface_hub import errors
    if isinstance(e, errors.GatedRepoError):  # a subclass of RepositoryNotFoundError: first
        return (f"{repo_id} is gated: accept its license on huggingface.co, then set HF_TOKEN (or "
                "run `hf auth login`)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return f"repo {repo_id} not found (or private: set HF_TOKEN)"
    if isinstance(e, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):
        return (f"cannot download {repo_id}: offline (HF_HUB_OFFLINE is set, or the Hub is "
                "unreachable)")
    if isinstance(e, errors.HfHubHTTPError):
        if getattr(e.response, "status_code", None) == 401:  # gated and private repos are above
            return ("the Hub refused the access token (HF_TOKEN, or the one `hf auth login` "
                    f"saved): {e.server_message or 'not a valid token'}")
        reason = f" ({e.server_message})" if e.server_message else ""
        return f"download of {repo_id} failed: {str(e).splitlines()[0]}{reason}"
    if isinstance(e, errors.HFValidationError):  # a malformed repo id
        return f"{repo_id}: {e}"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"disk full while downloading {repo_id}"
    # Network errors come from httpx or requests depending on the huggingface_hub version.
    network = type(e).__module__.split(".")[0].startswith(("httpx", "httpcore", "requests",
                                                           "urllib3"))  # httpx2 too
    if network or isinstance(e, (ConnectionError, TimeoutError)):
        return (f"cannot reach the Hugging Face Hub to download {repo_id} "
                f"({one_line(e)})")
    raise e


def is_checkpoint(folder: Path) -> bool:
    """Whether folder holds a converted gpt-blitz checkpoint (an HF snapshot's config does not read
    as one)."""
    try:
        read_checkpoint(folder)
        return True
    except InputError:
        return False


@contextmanager
def stopping_at_once(out: Path):
    """Ctrl-C and SIGTERM end the download at once: the hub's download threads would first finish
    the files they are on (minutes for a shard of several GB). The partial files this run began go
    too: huggingface_hub (2.4) names them afresh in each run, so that none would be resumed."""
    def partial_files() -> set:
        return set(out.glob(".cache/huggingface/**/*.incomplete"))

    def stop(signum, frame):
        for path in partial_files() - before:
            path.unlink(missing_ok=True)
        os._exit(128 + signum)  # as a shell reports a program that a signal stopped

    before = partial_files()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # a signal ignored (a background job's Ctrl-C) stays ignored
    previous = {s: h for s, h in previous.items() if h is not signal.SIG_IGN}
    for s in previous:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo_id", required=True, help="e.g. meta-llama/Llama-2-7b-chat-hf")
    parser.add_argument("--out", help="folder for the raw HF files "
                                      "(default: checkpoints/REPO_ID/hf)")
    from huggingface_hub.utils import logging as hub_logging
    hub_logging.set_verbosity_error()  # no per-retry warnings: a failure ends in the one line below
    with script_exits():
        args = parser.parse_args(argv)
        out = args.out or os.path.join("checkpoints", args.repo_id, "hf")
        check_folder_writable(Path(out), "--out")  # before the hub
        if is_checkpoint(Path(out)):  # the HF files would replace its config and tokenizer
            raise InputError(f"--out {out} holds a converted checkpoint: download the HF files "
                             "into a folder of their own (by default checkpoints/REPO_ID/hf)")
        with stopping_at_once(Path(out)):  # an empty HF_TOKEN is no token, as the hub reads it
            try:
                download(args.repo_id, out, token=os.environ.get("HF_TOKEN") or None)
            except InputError:
                raise
            except Exception as e:  # explain() makes the failures a download meets one line
                raise InputError(explain(e, args.repo_id)) from None
    print(f"done: {out}")


if __name__ == "__main__":
    main()
