"""Stage 2 of the test machine: look at the booted system from its own point
of view and report what it sees; the host (tests/boot/test_vm.py, vm/demo.py)
judges the report.

    python3 -I stage2.py CHECKS.json

CHECKS.json (all keys optional):
  inspect        paths to describe before anything is written
  writes         [{"path", "content", "as": [uid, gid] (optional)}] written
                 next, like a running system would (through the bind mounts
                 and links the script made), as root or as that user
  commands       [[args...]]: run "impermanence_boot.py --root / --config
                 CONFIG args..." on the booted system after the writes
                 (e.g. ["apply"] to see that a second apply changes nothing;
                 a --config in args names another config: the later wins)
  inspect_after  paths to describe after the writes and commands
  status         true: also run "impermanence_boot.py status --json" on the
                 booted system (--root /) and record its output
  trees          {name: directory}: walk each (before the writes) without
                 descending into mount points, e.g. the root the script made
                 and the one the shell approach made (/run/shell-root)
  mtab           true: record "findmnt --mtab" (the mount table as
                 libmount merges it with /run/mount/utab; the boot brings
                 findmnt with tools=["findmnt"]) and utab itself, before
                 the writes and after each command

The report is one line, "IMPVM-REPORT <json>", on /dev/ttyS1 (the host's
report file); a short human summary goes to the console.
Standard library only, few imports: everything imported here has to be in
the initramfs too.
"""
import json
import os
import stat
import sys

SCRIPT = "/nix/impermanence/impermanence_boot.py"
CONFIG = "/nix/impermanence/config.json"
PYTHON = "/nix/bin/python3"
STAGE1 = "/run/stage1"
FINDMNT = "/nix/bin/findmnt"
UTAB = "/run/mount/utab"
# mount points stage 1 creates itself on the new root (as NixOS stage 1 does)
STAGE1_MOUNTS = ("/nix", "/proc", "/sys", "/dev", "/run")


def now_ns():
    try:
        with open("/proc/timer_list") as f:
            for line in f:
                if line.startswith("now at"):
                    return int(line.split()[2])
    except OSError:
        pass
    return None


def read(path, limit=65536):
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def unescape(s):
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def mountinfo():
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mounts.append({"id": int(fields[0]), "parent": int(fields[1]),
                           "root": unescape(fields[3]), "point": unescape(fields[4]),
                           "options": fields[5], "fstype": fields[sep + 1],
                           "source": unescape(fields[sep + 2])})
    return mounts


def kind(mode):
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def describe_stat(st):
    return {"type": kind(st.st_mode), "mode": "%04o" % stat.S_IMODE(st.st_mode),
            "uid": st.st_uid, "gid": st.st_gid, "dev": st.st_dev, "ino": st.st_ino,
            "size": st.st_size}


def describe(path, mounts):
    info = {"path": path}
    try:
        st = os.lstat(path)
    except OSError as e:
        info["exists"] = False
        info["error"] = e.strerror
        return info
    info["exists"] = True
    info.update(describe_stat(st))
    points = [m for m in mounts if m["point"] == path]
    info["mountpoint"] = bool(points)
    if points:
        top = points[-1]
        info["mount"] = {"source": top["source"], "root": top["root"],
                         "fstype": top["fstype"], "count": len(points)}
    if stat.S_ISLNK(st.st_mode):
        info["readlink"] = os.readlink(path)
        try:
            info["follow"] = describe_stat(os.stat(path))
        except OSError as e:
            info["follow"] = {"error": e.strerror}
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            info["content"] = read(path, 4096)
    except OSError:
        pass
    return info


def walk_same_fs(base, points):
    """(path, lstat, is a mount point) for everything under base, in name
    order, not descending into other filesystems or mount points."""
    base_dev = os.lstat(base).st_dev

    def visit(path):
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return
        for name in names:
            p = path.rstrip("/") + "/" + name
            try:
                st = os.lstat(p)
            except OSError:
                continue
            mounted = p in points
            yield p, st, mounted
            if stat.S_ISDIR(st.st_mode) and st.st_dev == base_dev and not mounted:
                yield from visit(p)

    yield from visit(base)


def describe_entry(p, st):
    e = describe_stat(st)
    if stat.S_ISLNK(st.st_mode):
        e["readlink"] = os.readlink(p)
    return e


def walk_root(mounts):
    """Everything on the root filesystem, without descending into other
    mounts: what the script (and stage 1) created on the fresh root."""
    entries = []
    for p, st, mounted in walk_same_fs("/", {m["point"] for m in mounts}):
        e = describe_entry(p, st)
        e["path"] = p
        e["mountpoint"] = mounted
        entries.append(e)
    return entries


def walk_tree(base, mounts):
    """{path relative to base: entry} for everything under base on base's
    filesystem, not descending into mount points; a mount point's entry
    says what is mounted there (the top mount: its root within its
    filesystem, source, type). None if base does not exist."""
    if not os.path.lexists(base):
        return None
    by_point = {}
    for m in mounts:
        by_point[m["point"]] = m  # later lines are on top
    prefix = base.rstrip("/")
    out = {}
    for p, st, mounted in walk_same_fs(base, by_point):
        e = describe_entry(p, st)
        e["mountpoint"] = mounted
        if mounted:
            top = by_point[p]
            e["mount"] = {"root": top["root"], "source": top["source"],
                          "fstype": top["fstype"],
                          "count": sum(1 for m in mounts if m["point"] == p)}
        out[p[len(prefix):]] = e
    return out


def kmsg_lines():
    lines = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return lines
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: record overwritten; keep reading
                continue
            if not rec:
                break
            text = rec.decode("utf-8", "replace")
            msg = text.split(";", 1)[1].split("\n", 1)[0] if ";" in text else text
            # the script's lines, and the kernel's note when it dropped some
            # ("python3: N output lines suppressed due to ratelimiting")
            if "impermanence" in msg or "ratelimit" in msg:
                lines.append(msg)
    finally:
        os.close(fd)
    return lines


def write_as(path, content, ids):
    """Write a file as root, or, with ids = [uid, gid], in a child process
    running as that user (as the user's own programs would)."""
    if not ids:
        try:
            with open(path, "w") as f:
                f.write(content)
            return {"ok": True}
        except OSError as e:
            return {"ok": False, "error": "%s: %s" % (type(e).__name__, e.strerror)}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])
            with open(path, "w") as f:
                f.write(content)
            os.write(w, b"ok")
        except OSError as e:
            os.write(w, ("%s: %s" % (type(e).__name__, e.strerror)).encode())
        finally:
            os._exit(0)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return {"ok": True} if msg == "ok" else {"ok": False, "error": msg}


def run(argv):
    """Run a program, return (exit status, stdout, stderr); no subprocess."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            env = dict(os.environ, IMPERMANENCE_NO_KMSG="1")
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(out_w)
    os.close(err_w)
    chunks = {out_r: [], err_r: []}
    # the outputs are small; read stderr after stdout
    for fd in (out_r, err_r):
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks[fd].append(b)
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return (os.waitstatus_to_exitcode(status),
            b"".join(chunks[out_r]).decode("utf-8", "replace"),
            b"".join(chunks[err_r]).decode("utf-8", "replace"))


def mtab():
    """The userspace mount options as the booted system's tools see them:
    findmnt --mtab (mountinfo merged with utab by libmount) and utab."""
    rc, out, err = run([FINDMNT, "--mtab", "-n", "-r", "-o", "TARGET,OPTIONS"])
    try:
        names = sorted(os.listdir(os.path.dirname(UTAB)))
    except OSError:
        names = None
    return {"findmnt": {"exit": rc, "stdout": out, "stderr": err},
            "utab": read(UTAB), "utab_dir": names}


def main():
    spec = {}
    if len(sys.argv) > 1 and os.path.exists(sys.argv[1]):
        with open(sys.argv[1]) as f:
            spec = json.load(f)
    mounts = mountinfo()
    report = {"stage2_ns": now_ns()}
    stage1 = {"exit": None}
    exit_text = read(STAGE1 + "/exit")
    if exit_text is not None and exit_text.strip():
        stage1["exit"] = int(exit_text)
    stage1["stderr"] = read(STAGE1 + "/stderr") or ""
    for name in ("t_init", "t_switch"):
        t = read(STAGE1 + "/" + name)
        stage1[name] = int(t) if t and t.strip() else None
    for name in ("t_script", "t_python_pass", "t_python_pass2", "t_shell_mount", "t_shell"):
        t = read(STAGE1 + "/" + name)
        stage1[name] = [int(x) for x in t.split()] if t and t.strip() else None
    stage1["insmod_log"] = read(STAGE1 + "/insmod.log") or ""
    shell_exit = read(STAGE1 + "/shell_exit")
    stage1["shell_exit"] = int(shell_exit) if shell_exit and shell_exit.strip() else None
    stage1["shell_stderr"] = read(STAGE1 + "/shell.stderr") or ""
    # stage 1's snapshots of the initramfs and the fresh root around the
    # script (/nix/scenario/snapshot), as text; the host parses them
    for name in ("snapshot-before", "snapshot-after"):
        stage1[name] = read(STAGE1 + "/" + name, 1 << 20)
    report["stage1"] = stage1
    report["uptime"] = read("/proc/uptime")
    report["mounts"] = mounts
    report["root_entries"] = walk_root(mounts)
    report["trees"] = {name: walk_tree(base, mounts)
                       for name, base in sorted(spec.get("trees", {}).items())}
    report["inspect"] = {p: describe(p, mounts) for p in spec.get("inspect", [])}
    report["environ"] = dict(os.environ)
    if spec.get("mtab"):
        t0 = now_ns()
        report["mtab"] = mtab()
        report["mtab"]["ns"] = [t0, now_ns()]
    writes = []
    for w in spec.get("writes", []):
        result = {"path": w["path"]}
        result.update(write_as(w["path"], w["content"], w.get("as")))
        writes.append(result)
    report["writes"] = writes
    os.sync()
    commands = []
    for args in spec.get("commands", []):
        t0 = now_ns()
        rc, out, err = run([PYTHON, "-I", SCRIPT, "--root", "/", "--config", CONFIG, *args])
        commands.append({"args": args, "exit": rc, "stdout": out, "stderr": err,
                         "ns": [t0, now_ns()]})
        if spec.get("mtab"):
            commands[-1]["mtab"] = mtab()
    report["commands"] = commands
    mounts = mountinfo()
    report["mounts_after"] = mounts
    report["inspect_after"] = {p: describe(p, mounts) for p in spec.get("inspect_after", [])}
    if spec.get("status"):
        rc, out, err = run([PYTHON, "-I", SCRIPT, "--root", "/", "--config", CONFIG,
                            "status", "--json"])
        report["status"] = {"exit": rc, "stdout": out, "stderr": err}
    report["kmsg"] = kmsg_lines()

    line = "IMPVM-REPORT " + json.dumps(report, sort_keys=True) + "\n"
    try:
        with open("/dev/ttyS1", "w") as f:
            f.write(line)
    except OSError:
        sys.stdout.write(line)
    print("stage 2: impermanence_boot.py exit status in stage 1: %s" % stage1["exit"])
    print("stage 2: %d entries on the new root, %d mounts; report written"
          % (len(report["root_entries"]), len(mounts)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
