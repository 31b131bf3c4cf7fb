"""checkpoint.write_files: a set of files appears whole or not at all. read_weights and
WeightsFile: a damaged weights file is one InputError, a bug inside the reader keeps its
traceback."""
import argparse
import contextlib
import errno
import io
import json
import multiprocessing
import os
import socket
import stat
import struct
import subprocess
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
import kernels
from checkpoint import (JOURNAL, InputError, WeightsFile, check_tensors, empty_model, load_model,
                        parse_config, read_checkpoint, read_weights, write_files, write_safetensors)
from model import ModelArgs, Transformer

CONFIG = {"dim": 8, "n_layer": 1, "n_head": 2, "vocab_size": 16, "intermediate_size": 8}
DEAD_PID = 2 ** 22 + 12345  # above Linux's default pid_max: no such process


def names(folder) -> list:
    return sorted(p.name for p in folder.iterdir())


def test_a_set_replaces_the_old_files_and_removes_the_stale_ones(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "stale.txt").write_text("old")
    write_files(tmp_path, {"a.txt": lambda p: p.write_text("new a"),
                           "b.txt": lambda p: p.write_text("b")}, remove=["stale.txt"])
    assert names(tmp_path) == ["a.txt", "b.txt"]
    assert (tmp_path / "a.txt").read_text() == "new a"


def test_a_full_disk_says_so_and_changes_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("old a")

    def full(path):
        path.write_text("half of it")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(InputError, match="disk full"):
        write_files(tmp_path, {"b.txt": lambda p: p.write_text("b"), "a.txt": full})
    assert names(tmp_path) == ["a.txt"]  # no temp files, no half of the set
    assert (tmp_path / "a.txt").read_text() == "old a"


@pytest.fixture
def small_disk(tmp_path):
    """A file system of 64 KiB (a tmpfs: mounting one needs root), for a disk that really fills."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_checkpoint_that_fills_the_disk_says_so_in_one_line_and_leaves_nothing(small_disk):
    """safetensors reports the OS's ENOSPC as a SafetensorError of its own: it is still a full
    disk, not a bug."""
    args = ModelArgs(dim=64, n_layer=2, n_head=2, vocab_size=512, intermediate_size=128)
    tensors = Transformer(args).state_dict()  # ~0.6 MB of float32
    with pytest.raises(InputError, match="disk full while writing into .*nothing was changed"):
        checkpoint.save_checkpoint(small_disk / "out", args, tensors)
    assert names(small_disk) == []  # neither the folder it made nor a temp file or folder


def test_a_pth_or_tokenizer_that_fills_the_disk_says_so_in_one_line_and_leaves_nothing(small_disk):
    """torch.save (quantize.py's weights) and the tokenizers library (convert_gguf.py's
    tokenizer.json) report the OS's ENOSPC in errors of their own: still a full disk, not a bug."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    tensors = Transformer(ModelArgs(dim=64, n_layer=2, n_head=2, vocab_size=512,
                                    intermediate_size=128)).state_dict()  # ~0.6 MB of float32
    words = Tokenizer(WordLevel({f"word{i}": i for i in range(20_000)}, unk_token="word0"))
    for name, writer in (("model.pth", lambda tmp: checkpoint.write_pth(tensors, tmp)),
                         ("tokenizer.json", lambda tmp: words.save(str(tmp)))):  # ~0.3 MB
        with pytest.raises(InputError, match="disk full while writing into .*nothing was changed"):
            write_files(small_disk / "out", {name: writer})
        assert names(small_disk) == []


def test_a_bug_in_a_writer_keeps_its_traceback_and_leaves_no_temp_files(tmp_path):
    def broken(path):
        path.write_text("x")
        raise ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        write_files(tmp_path, {"a.txt": broken})
    assert names(tmp_path) == []


def test_a_gpt_fast_model_pth_path_finds_the_checkpoints_model_safetensors(tmp_path):
    save_file(Transformer(ModelArgs(**CONFIG)).state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    assert read_checkpoint(tmp_path / "model.pth").weights == tmp_path / "model.safetensors"


def test_a_write_killed_between_its_renames_is_completed_by_the_next_reader(tmp_path):
    """The journal is written once every temp file is complete: a process killed after it, while
    renaming, leaves a journal that read_checkpoint carries out before reading."""
    (tmp_path / ".config.json.x.tmp").write_text(json.dumps(CONFIG))
    (tmp_path / "model.safetensors").write_bytes(b"")  # an earlier rename already happened
    (tmp_path / "stale.json").write_text("{}")
    (tmp_path / JOURNAL).write_text(json.dumps({"rename": [[".config.json.x.tmp", "config.json"]],
                                                "remove": ["stale.json"]}))
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.args.dim == 8
    assert names(tmp_path) == ["config.json", "model.safetensors"]
    assert not (tmp_path / JOURNAL).exists()


def test_a_journal_partly_carried_out_before_a_kill_is_finished_from_where_it_stopped(tmp_path):
    """A process killed while it carried out a journal (the writer, or a reader finishing it) leaves
    its renames and some of its removals done: the next reader skips those and does the rest."""
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "stale.json").write_text("{}")
    (tmp_path / JOURNAL).write_text(json.dumps({
        "rename": [[".model.safetensors.x.tmp", "model.safetensors"], [".config.json.x.tmp", "config.json"]],
        "remove": ["model.pth", "stale.json"]}))
    assert read_checkpoint(tmp_path).args.dim == 8
    assert names(tmp_path) == ["config.json", "model.safetensors"]


def test_a_write_killed_between_its_renames_is_completed_before_the_next_write(tmp_path):
    """Once its journal is written a set is the checkpoint: the next write into the folder carries the
    journal out first, rather than take its temp files (their writer is gone) for orphans."""
    tmp = f".config.json.{socket.gethostname()}-{DEAD_PID}.tmp"
    (tmp_path / tmp).write_text(json.dumps(CONFIG))
    (tmp_path / "stale.json").write_text("{}")
    (tmp_path / JOURNAL).write_text(json.dumps({"rename": [[tmp, "config.json"]], "remove": ["stale.json"]}))
    write_files(tmp_path, {"a.txt": lambda p: p.write_text("a")})
    assert names(tmp_path) == ["a.txt", "config.json"]
    assert json.loads((tmp_path / "config.json").read_text()) == CONFIG


def test_a_converter_completes_a_write_killed_between_its_renames_then_refuses_it_as_a_checkpoint(
        tmp_path):
    """A converter's check of its output folder carries out a killed writer's journal first: the
    folder then holds that whole checkpoint, config included, which it refuses without --force
    rather than name a half of it."""
    (tmp_path / ".config.json.x.tmp").write_text(json.dumps(CONFIG))
    (tmp_path / "model.safetensors").write_bytes(b"")  # renamed before the kill
    (tmp_path / JOURNAL).write_text(json.dumps({"rename": [[".config.json.x.tmp", "config.json"]],
                                                "remove": []}))
    with pytest.raises(InputError, match=r"holds a checkpoint already \(config.json, model"):
        checkpoint.check_output_folder(tmp_path, "--out", force=False)
    assert names(tmp_path) == ["config.json", "model.safetensors"]


def test_written_files_get_the_permissions_of_the_umask_not_those_of_a_private_temp_file(tmp_path):
    """A writer may make its temp file private (safetensors' own temp file is); the checkpoint's files
    are readable as any file this process creates."""

    def private(path):
        path.write_text("a")
        path.chmod(0o600)
    write_files(tmp_path, {"a.txt": private,
                           "model.safetensors": lambda p: write_safetensors({"w": torch.ones(2)}, p)})
    umask = os.umask(0)
    os.umask(umask)
    for name in ("a.txt", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_journal_carried_out_by_another_process_meanwhile_is_no_error(tmp_path, monkeypatch):
    """A reader may find a journal that another process (the writer, another reader) carries out
    before this one holds the folder's lock: this one then finds nothing left to do."""
    (tmp_path / ".config.json.x.tmp").write_text(json.dumps(CONFIG))
    (tmp_path / JOURNAL).write_text(json.dumps({"rename": [[".config.json.x.tmp", "config.json"]],
                                                "remove": []}))
    folder_lock, others = checkpoint.folder_lock, []

    @contextlib.contextmanager
    def the_other_process_first(folder):
        if not others:
            others.append(folder)
            checkpoint.finish_write(folder)
        with folder_lock(folder):
            yield

    monkeypatch.setattr(checkpoint, "folder_lock", the_other_process_first)
    checkpoint.finish_write(tmp_path)
    assert others and names(tmp_path) == ["config.json"]
    assert json.loads((tmp_path / "config.json").read_text()) == CONFIG


def test_two_writers_at_once_take_turns_at_their_renames(tmp_path, monkeypatch):
    """Every journal has one name. Without the folder's lock, a second writer (another process)
    that looked for a pending journal just before the first one's landed renamed its own in while
    the first carried out its own: the sets mixed (its renames between the first one's), or one
    was lost (a journal unlinked unread, its temp files left). Here the second one is let go just
    so: it waits for the lock, and its set replaces the first one whole."""
    fork = multiprocessing.get_context("fork")
    replace, parent, second = os.replace, os.getpid(), []
    go, at_commit, mid_renames = fork.Event(), fork.Event(), fork.Event()

    def in_turn(source, destination):
        first, journal = os.getpid() == parent, os.path.basename(destination) == JOURNAL
        if first and journal:  # the second one may commit before this journal lands
            go.set()
            at_commit.wait(timeout=1)  # the lock holds it back: the wait runs out
        if not first and journal:  # its journal lands while the first one's renames are under way
            at_commit.set()
            mid_renames.wait(timeout=60)
        replace(source, destination)
        if first and os.path.basename(destination) == "a":
            mid_renames.set()
            second[0].join(timeout=1)  # time to commit, were it not made to wait

    def start_the_second_writer(path):  # the first one's last temp file
        path.write_text("first")
        second.append(fork.Process(target=write_files, args=(tmp_path, {
            "a": lambda p: go.wait(timeout=60) and p.write_text("second"),
            "b": lambda p: p.write_text("second")})))
        second[0].start()
    monkeypatch.setattr(checkpoint.os, "replace", in_turn)
    try:
        write_files(tmp_path, {"a": lambda p: p.write_text("first"), "b": start_the_second_writer})
        second[0].join(timeout=60)
        assert second[0].exitcode == 0
    finally:
        for process in second:
            process.kill()
    assert names(tmp_path) == ["a", "b"]
    assert [(tmp_path / name).read_text() for name in "ab"] == ["second", "second"]


def test_a_journal_left_meanwhile_by_a_killed_writer_is_carried_out_before_the_next_one(tmp_path):
    """A writer killed between its journal's rename and its renames leaves a set that is the
    checkpoint already. A writer that found no journal when it began carries that one out before
    it renames its own journal into place, rather than over it."""
    def a_killed_writer_meanwhile(path):
        path.write_text("b")
        (tmp_path / ".c.otherhost-1.tmp").write_text("c")
        (tmp_path / JOURNAL).write_text(json.dumps({"rename": [[".c.otherhost-1.tmp", "c"]],
                                                    "remove": []}))
    write_files(tmp_path, {"b": a_killed_writer_meanwhile})
    assert names(tmp_path) == ["b", "c"]


def test_a_file_system_without_locks_still_takes_a_write(tmp_path, monkeypatch):
    """flock is refused on some network file systems: a lone writer there needs no lock."""
    def no_locks_here(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks_here)
    write_files(tmp_path, {"a": lambda p: p.write_text("a")})
    assert names(tmp_path) == ["a"]


def test_weights_of_another_shape_than_the_config_gives_are_an_input_error_naming_the_tensor(tmp_path):
    """A config that does not describe its weights (a size edited, another model's file): one sentence
    naming the first tensor of another shape, not load_state_dict's traceback."""
    save_file(Transformer(ModelArgs(**CONFIG)).state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "intermediate_size": 16}))
    with pytest.raises(InputError, match=r"layers\.0\.feed_forward\.w13\.weight has shape \[16, 8\], "
                                         r"expected \[32, 8\]"):
        load_model(read_checkpoint(tmp_path))


@pytest.mark.parametrize("journal", [
    {"rename": [], "remove": ["../victim.txt"]},  # a file outside the folder
    {"rename": [["../victim.txt", "stolen.txt"]], "remove": []},
    {"rename": [[".config.json.x.tmp", "../victim.txt"]], "remove": []},
    {"rename": [["config.json", "model.safetensors"]], "remove": []},  # not a temp file
    {"rename": [[".config.json.x.tmp", "model.safetensors"]], "remove": []},  # another file's temp file
    {"rename": [[".config.json.x", "config.json"]], "remove": []},  # not a temp file's name
    {"rename": [], "remove": ["hf"]},  # a folder (a downloaded snapshot): write_files removes files
    {"rename": [[".hf.x.tmp", "hf"]], "remove": []},
    {"rename": [], "remove": ["x" * 256]}, {"rename": [], "remove": ["\ud800"]},  # no file's name
    {"rename": [], "remove": ["a\0b"]},
    {}, {"rename": [["a"]], "remove": []}, {"rename": "x", "remove": []}])
def test_a_journal_that_reaches_outside_its_folder_or_is_malformed_is_refused(tmp_path, journal):
    """A folder read as a checkpoint is the user's input: its journal may only move its own
    temp files into place and remove its own files."""
    folder = tmp_path / "ckpt"
    (folder / "hf").mkdir(parents=True)
    (tmp_path / "victim.txt").write_text("keep me")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / ".config.json.x.tmp").write_text("{}")
    (folder / JOURNAL).write_text(json.dumps(journal))
    with pytest.raises(InputError, match="not a write journal"):
        read_checkpoint(folder)
    assert (tmp_path / "victim.txt").read_text() == "keep me"
    assert names(folder) == sorted([JOURNAL, ".config.json.x.tmp", "config.json", "hf"])


def test_a_file_name_may_have_up_to_name_max_bytes_counted_in_utf8():
    assert checkpoint.is_file_name("x" * checkpoint.NAME_MAX)
    assert not checkpoint.is_file_name("x" * (checkpoint.NAME_MAX + 1))
    assert not checkpoint.is_file_name("é" * 128)  # 256 bytes


def test_a_journal_whose_temp_file_is_a_link_is_refused_and_its_target_left_alone(tmp_path):
    """Carrying out a journal makes its temp files readable: through a link that would chmod a
    file anywhere (a private key made world-readable)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("key")
    secret.chmod(0o600)
    (folder / ".config.json.x.tmp").symlink_to(secret)
    (folder / JOURNAL).write_text(json.dumps({"rename": [[".config.json.x.tmp", "config.json"]],
                                              "remove": []}))
    with pytest.raises(InputError, match=r"\.config\.json\.x\.tmp is a link"):
        read_checkpoint(folder)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert names(folder) == sorted([JOURNAL, ".config.json.x.tmp"])


def test_a_write_interrupted_just_after_its_journal_lands_leaves_the_new_set(tmp_path, monkeypatch):
    """SIGTERM or Ctrl-C between the journal's rename and the end of the write: the new set is the
    checkpoint by then, so it is carried out, not cleaned away with the old one's files gone."""
    write_files(tmp_path, {"config.json": lambda p: p.write_text("old"),
                           "model.pth": lambda p: p.write_text("old")})
    replace = os.replace

    def interrupted(source, destination):
        replace(source, destination)
        if os.path.basename(destination) == JOURNAL:
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_files(tmp_path, {"config.json": lambda p: p.write_text("new"),
                               "model.safetensors": lambda p: p.write_text("new")},
                    remove=["model.pth"])
    assert names(tmp_path) == ["config.json", "model.safetensors"]
    assert (tmp_path / "config.json").read_text() == "new"


def test_a_report_that_would_replace_another_file_of_its_run_is_refused(tmp_path):
    (tmp_path / "prompts.txt").write_text("hi")
    with pytest.raises(InputError, match=r"--out .*prompts\.txt is also another file of this run"):
        checkpoint.check_output(tmp_path / "prompts.txt", "--out", inputs=[None, str(tmp_path / "prompts.txt")])
    checkpoint.check_output(tmp_path / "report.json", "--out", inputs=[None, tmp_path / "prompts.txt"])


def test_a_folder_where_a_file_of_the_set_goes_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "tokenizer.json").mkdir()
    with pytest.raises(InputError, match="tokenizer.json is a folder, where the checkpoint writes"):
        write_files(tmp_path, {"config.json": lambda p: p.write_text("{}"),
                               "tokenizer.json": lambda p: p.write_text("{}")})
    assert names(tmp_path) == ["tokenizer.json"]


def test_a_folder_the_file_system_will_not_create_is_one_error_line():
    """/proc takes no new folders, which neither os.access nor the walk up to an existing folder
    can tell beforehand: mkdir's failure is the error line (root's or another user's)."""
    folder = Path("/proc/gpt-blitz-no-such-folder/sub")
    with pytest.raises(InputError, match=f"cannot create {folder}: "):
        write_files(folder, {"config.json": lambda p: p.write_text("{}")})


@pytest.mark.parametrize("error, number, words", [
    (PermissionError, errno.EPERM, "Operation not permitted"), (OSError, errno.EROFS, "Read-only file system")],
    ids=["another-users-folder", "read-only-file-system"])
def test_a_cut_short_write_that_this_process_may_not_finish_is_one_error_line(tmp_path, monkeypatch, error,
                                                                             number, words):
    """A read-only folder, or another user's: the journal cannot be carried out by this reader."""
    (tmp_path / ".config.json.x.tmp").write_text(json.dumps(CONFIG))
    (tmp_path / JOURNAL).write_text(json.dumps({"rename": [[".config.json.x.tmp", "config.json"]],
                                                "remove": []}))

    def refused(path, mode):
        raise error(number, words, str(path))
    monkeypatch.setattr(checkpoint.os, "chmod", refused)
    with pytest.raises(InputError, match=f"holds a write that was cut short .*{words}"):
        read_checkpoint(tmp_path)


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_write_and_no_others(tmp_path):
    """A temp file names its writer's host and pid (checkpoint.temp_name): the next write removes
    those of a writer of this machine that is gone (a pid beyond any is no process), and leaves
    those of a writer still running (this process, in another thread say) and of one on another
    machine sharing the folder, whose pid means nothing here."""
    host = socket.gethostname()
    orphan = f".model.safetensors.{host}-{DEAD_PID}.tmp"
    running = f".model_int8.pth.{host}-{os.getpid()}.tmp"  # as temp_name names this process's
    elsewhere = f".model.safetensors.not-{host}-{DEAD_PID}.tmp"  # another machine; no such pid here
    beyond = f".config.json.{host}-{2 ** 64}.tmp"
    for name in (orphan, running, elsewhere, beyond):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    write_files(tmp_path, {"a.txt": lambda p: p.write_text("a")})
    assert names(tmp_path) == sorted([running, elsewhere, "a.txt"])


def test_temp_files_of_another_users_running_writer_and_what_orphan_links_point_to_are_kept(
        tmp_path, monkeypatch):
    """A pid that signal 0 may not reach (PermissionError) is another user's process: running, its temp
    file stays. A dead writer's temp entry that is a link goes, the link itself and not its target."""
    host = socket.gethostname()
    theirs = DEAD_PID + 1  # no such process either: signal 0 is made to answer as for another user's
    kill = os.kill

    def other_users(pid, signal):
        if pid == theirs:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return kill(pid, signal)
    monkeypatch.setattr(checkpoint.os, "kill", other_users)
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("the user's")
    running = f".model.safetensors.{host}-{theirs}.tmp"
    (tmp_path / running).write_text("half a checkpoint")
    (tmp_path / f".safetensors.{host}-{DEAD_PID}.tmp").symlink_to(tmp_path / "target")
    write_files(tmp_path, {"a.txt": lambda p: p.write_text("a")})
    assert names(tmp_path) == sorted([running, "a.txt", "target"])
    assert (tmp_path / "target" / "keep.txt").read_text() == "the user's"


KILLED_MID_SAVE = """
import os, signal, sys
from pathlib import Path
import safetensors.torch, torch
from checkpoint import write_files, write_safetensors

def save_file(tensors, path):  # as safetensors 0.8 does: its own temp file beside the target
    with open(os.path.join(os.path.dirname(path), ".tmpAbC123"), "wb") as f:
        f.write(b"half of the weights")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = save_file
write_files(Path(sys.argv[1]), {"model.safetensors": lambda p: write_safetensors({"w": torch.ones(2)}, p)})
"""


def test_safetensors_own_temp_file_of_a_killed_writer_goes_with_the_next_write(tmp_path):
    """safetensors writes through a temp file of its own, under a random name beside its target;
    write_safetensors gives it a folder that the next write knows to remove after a SIGKILL, and
    a user's file of such a name is left alone."""
    import subprocess
    import sys
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ".tmpUser1").write_text("the user's")
    killed = subprocess.Popen([sys.executable, "-c", KILLED_MID_SAVE, str(folder)],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert killed.wait() == -9
    left = [p for p in folder.iterdir() if p.name != ".tmpUser1"]
    assert [p.name for p in left] == [f".safetensors.{socket.gethostname()}-{killed.pid}.tmp"]
    assert [p.name for p in left[0].iterdir()] == [".tmpAbC123"]  # save_file's, inside it
    write_files(folder, {"a.txt": lambda p: p.write_text("a")})
    assert names(folder) == [".tmpUser1", "a.txt"]


def test_a_safetensors_write_leaves_only_its_file_even_where_a_killed_writer_of_its_pid_left_a_folder(tmp_path):
    """pids are reused: a scratch folder that write_safetensors left under this process's host and pid
    (remove_orphans takes it for a running writer's) is replaced, and the finished write leaves none."""
    scratch = tmp_path / checkpoint.temp_name("safetensors")
    scratch.mkdir()
    (scratch / "weights").write_bytes(b"half of the weights")
    write_files(tmp_path, {"model.safetensors": lambda p: write_safetensors({"w": torch.ones(2)}, p)})
    assert names(tmp_path) == ["model.safetensors"]
    assert read_weights(tmp_path / "model.safetensors")["w"].tolist() == [1.0, 1.0]


def test_a_write_that_fails_into_a_new_folder_leaves_no_folder(tmp_path):
    def interrupted(path):
        path.write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_files(tmp_path / "new", {"a.txt": interrupted})
    assert names(tmp_path) == []
    (tmp_path / "mine").mkdir()  # folders it made go, from the innermost up; others stay
    with pytest.raises(KeyboardInterrupt):
        write_files(tmp_path / "mine" / "new" / "deeper", {"a.txt": interrupted})
    assert names(tmp_path) == ["mine"] and names(tmp_path / "mine") == []


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_inside_torch_save_stops_the_write_as_that_signal(tmp_path, monkeypatch, stop):
    """torch's zip writer, cut short inside a tensor's record, raises a RuntimeError of its own
    while it closes the file: the Ctrl-C (or SIGTERM's SystemExit) is what reaches the script,
    which then exits 130 (143) without a traceback, and the folder is as it was."""
    class CutShort(io.FileIO):
        def write(self, data):
            if self.tell() > 4096:  # inside the first tensor's data
                raise stop
            return super().write(data)
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: CutShort(path, mode), raising=False)
    tensors = {"w": torch.zeros(64, 1024)}
    with pytest.raises(type(stop)):
        write_files(tmp_path, {"model.pth": partial(checkpoint.write_pth, tensors)})
    assert names(tmp_path) == []


def test_quantized_weights_must_come_in_their_own_integer_dtype_and_float_ones_in_a_float_dtype():
    """Float weights are converted, so any float dtype will do; integer ones are bit patterns (int4's
    nibble pairs would be read sign-extended from int8, an int8 weight widened to int32 would be
    multiplied as it is), so only their own dtype will do, and no float weight comes as integers."""
    record = {"format": kernels.FORMAT, "mode": "int4", "groupsize": 32, "layers": ["layers.0.attention.wo"]}
    model = empty_model(ModelArgs(**{**CONFIG, "dim": 32}), record)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    check_tensors(shapes, model, "model.pth", dtypes)
    check_tensors(shapes, model, "model.pth", {**dtypes, "layers.0.attention.wqkv.weight": torch.float16})
    for name, dtype, word in [("layers.0.attention.wo.weight", torch.int8, "torch.uint8"),
                              ("layers.0.attention.wo.weight", torch.int32, "torch.uint8"),
                              ("layers.0.attention.wqkv.weight", torch.int8, "floats")]:
        with pytest.raises(InputError, match=f"model.pth: {name} is {dtype}, expected {word}"):
            check_tensors(shapes, model, "model.pth", {**dtypes, name: dtype})


# One layer of Llama-2-7B's: a vocabulary of 10**9 tokens keeps it under MAX_PARAMETERS (its
# embedding and output layer 8.2e12 parameters), one of 2 * 10**9 does not.
BIG_VOCABULARY = {"dim": 4096, "n_layer": 1, "n_head": 32, "intermediate_size": 11008, "block_size": 2048}
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("fields, words", [
    ({"head_dim": 3}, "head_dim 3 even"),  # rotary turns pairs of columns
    ({"n_head": 16, "n_kv_heads": 16}, "head_dim 0 even"),  # more heads than dim's columns, no head_dim
    ({"n_kv_heads": 2, "n_head": 3, "dim": 12}, "n_head 3 must be a multiple of n_kv_heads 2"),
    ({"rope_scaling": {**LLAMA3_SCALING, "high_freq_factor": 1.0}}, "rope_scaling"),  # blends by 1 / (high - low)
    ({"norm_eps": 0}, "norm_eps must be a number above 0"),
    ({"rope_base": 0.0}, "rope_base must be a number above 1"),
    ({"rope_base": 5e-324}, "rope_base must be a number above 1"),  # frequencies of inf
    ({"rope_base": 10**20}, "rope_base must be a number above 1"),  # an int beyond int64
    ({"norm_eps": float("nan")}, "norm_eps must be a number above 0"),
    ({"rope_scaling": {**LLAMA3_SCALING, "factor": 10**400}}, "rope_scaling"),
    ({"block_size": 0}, "block_size must be a positive integer"),
    ({"n_experts": 4, "n_active_experts": 5}, "n_active_experts 5 must be between 1 and n_experts 4"),
    ({"n_layer": checkpoint.MAX_LAYERS + 1}, f"n_layer {checkpoint.MAX_LAYERS + 1} is beyond any model"),
    ({"block_size": checkpoint.MAX_BLOCK_SIZE + 1}, f"block_size {checkpoint.MAX_BLOCK_SIZE + 1}: beyond any model"),
    ({**BIG_VOCABULARY, "vocab_size": 2 * 10**9}, "1.64e\\+13 parameters and block_size 2048: beyond any model"),
], ids=["odd-head_dim", "heads-beyond-dim", "heads", "rope-high-equals-low", "norm_eps-0", "rope_base-0",
        "rope_base-tiny", "rope_base-beyond-int64", "norm_eps-nan", "rope-factor-beyond-float", "block_size-0",
        "more-active-than-experts", "n_layer-beyond-the-limit", "block_size-beyond-the-limit",
        "embedding-and-output-beyond-the-parameter-limit"])
def test_configs_no_model_can_run_are_refused_in_one_sentence(fields, words):
    with pytest.raises(InputError, match=f"^config.json: .*{words}"):
        parse_config({**CONFIG, **fields}, "config.json")


def test_a_tied_checkpoint_may_also_store_its_output_layer():
    """Some exports keep lm_head's copy of a tied embedding: accepted (and read as the embedding)."""
    model = empty_model(parse_config({**CONFIG, "tie_embeddings": True}, "config.json"))
    found = {name: t.shape for name, t in model.state_dict().items()}
    assert "output.weight" in found
    check_tensors(found, model, "model.pth")


def test_a_tied_checkpoint_is_saved_with_its_output_layer_stored_once_as_the_embedding(tmp_path):
    args = ModelArgs(**{**CONFIG, "tie_embeddings": True})
    model = Transformer(args)
    assert model.output.weight is model.tok_embeddings.weight  # tied as built, before any load
    checkpoint.save_checkpoint(tmp_path / "ckpt", args, model.state_dict())
    stored = read_weights(tmp_path / "ckpt" / "model.safetensors")
    assert sorted(stored) == sorted(name for name in model.state_dict() if name != "output.weight")
    loaded = load_model(read_checkpoint(tmp_path / "ckpt"))
    assert loaded.output.weight is loaded.tok_embeddings.weight


def test_configs_at_the_limits_are_accepted():
    """Every expert active (a dense mixture), one head of two columns, Llama-3.1's scaling, as many
    layers as any model may have, a vocabulary of a billion tokens."""
    for fields in ({"n_experts": 4, "n_active_experts": 4}, {"n_head": 1, "dim": 2, "head_dim": 2},
                   {"rope_scaling": LLAMA3_SCALING}, {"n_layer": checkpoint.MAX_LAYERS},
                   {**BIG_VOCABULARY, "vocab_size": 10**9}):
        args = parse_config({**CONFIG, **fields}, "config.json")
        assert all(getattr(args, name) == value for name, value in fields.items())


def test_a_gpu_index_is_checked_against_the_gpus_this_machine_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert checkpoint.check_device("cuda:1", "--device") == torch.device("cuda:1")
    with pytest.raises(InputError, match="--device cuda:2: this machine has 2 GPUs"):
        checkpoint.check_device("cuda:2", "--device")


# ---- reading weights -----------------------------------------------------------------------------

def weights_file(folder, suffix: str):
    path = folder / f"model{suffix}"
    tensors = {"w": torch.ones(4, 4)}
    save_file(tensors, path) if suffix == ".safetensors" else torch.save(tensors, path)
    return path


def a_zip_not_written_by_torch() -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as z:
        z.writestr("notes.txt", "hello")
    return data.getvalue()


DAMAGE = {  # name: what the file becomes, given its bytes
    "truncated": lambda data: data[:len(data) // 2],
    "empty": lambda data: b"",
    "text": lambda data: b"not weights",
    "header-claims-more-than-the-file": lambda data: struct.pack("<Q", len(data)) + data[8:],
    "zip-not-torch": lambda data: a_zip_not_written_by_torch(),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("damage", [*DAMAGE, "folder"])
def test_a_damaged_weights_file_is_an_input_error_for_both_readers(tmp_path, suffix, damage):
    path = weights_file(tmp_path, suffix)
    if damage == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(DAMAGE[damage](path.read_bytes()))
    for reader in (read_weights, WeightsFile):
        with pytest.raises(InputError, match="cannot read weights"):
            reader(path)


def test_a_pth_holding_a_class_weights_only_refuses_is_an_input_error(tmp_path):
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1e-3)}, tmp_path / "model.pth")
    with pytest.raises(InputError, match="cannot read weights .*UnpicklingError"):
        read_weights(tmp_path / "model.pth")


def broken(*args, **kwargs):
    raise TypeError("a bug inside the library")


@pytest.mark.parametrize("suffix, reader, library_call", [
    (".safetensors", read_weights, "safetensors.torch.load_file"),
    (".pth", read_weights, "torch.load"),
    (".safetensors", WeightsFile, "safetensors.safe_open"),
], ids=["safetensors-load_file", "torch.load", "safetensors-safe_open"])
def test_a_bug_inside_the_weights_readers_keeps_its_traceback(tmp_path, monkeypatch, suffix, reader,
                                                             library_call):
    path = weights_file(tmp_path, suffix)
    monkeypatch.setattr(library_call, broken)
    with pytest.raises(TypeError, match="a bug inside the library"):
        reader(path)


def test_a_tensor_of_a_dtype_no_model_reads_is_an_input_error(tmp_path):
    header = json.dumps({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    with pytest.raises(InputError, match="w is F4, a dtype this project does not read"):
        WeightsFile(tmp_path / "model.safetensors")


def test_a_write_that_fails_before_its_journal_takes_effect_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """The new set's temp files and its journal written, the lock on the folder fails (an I/O error): the
    temp files and the journal go, and the old checkpoint stays as it was."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")

    @contextlib.contextmanager
    def failing_lock(folder):
        raise OSError(errno.EIO, "Input/output error")
        yield
    monkeypatch.setattr(checkpoint, "folder_lock", failing_lock)
    with pytest.raises(OSError, match="Input/output error"):
        write_files(folder, {"model.safetensors": lambda p: p.write_bytes(b"new"),
                             "config.json": lambda p: p.write_text('{"new": 1}')})
    assert os.listdir(folder) == ["config.json"] and (folder / "config.json").read_text() == "{}"
