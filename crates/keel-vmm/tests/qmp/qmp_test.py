#!/usr/bin/env python3
"""Drives a VMM running the test guest's `idle` scenario through QMP with QEMU's own
Python client (`qemu.qmp`, from PyPI), and checks what the VMM does.

    qmp_test.py --target keel --vmm target/debug/keel --guest GUEST --workdir DIR
    qmp_test.py --target qemu --guest GUEST --workdir DIR

The same checks run against both: QEMU 10 (`-M pc`, whose PIIX4 ACPI power button the
guest handles; `-qmp unix:PATH,server=on,wait=off`) proves the script, the script proves
keel. QEMU's -qmp socket serves one client at a time, so the checks that need several
clients at once run against keel only. Prints one line per check and `qmp-test: PASS`
at the end; any failure raises.
"""

import argparse
import asyncio
import contextlib
import errno
import json
import os
import re
import socket
import subprocess
import time

from qemu.qmp import ConnectError, ExecuteError, QMPClient

# A guest tick is 100 ms; allow for slow, shared machines.
BOOT_TIMEOUT = 60.0
EVENT_TIMEOUT = 10.0


def log(msg):
    print(f"qmp-test: {msg}", flush=True)


def disk_format(path):
    return "qcow2" if path.endswith(".qcow2") else "raw"


def disk_tick(path):
    """The tick line the idle guest last wrote to block 0 of a raw image, or None."""
    with open(path, "rb") as f:
        block = f.read(4096)
    m = re.match(rb"keel-test tick (\d+)\n", block)
    return int(m.group(1)) if m else None


class Vm:
    """One VMM process running the idle guest, with a serial log and a QMP socket."""

    def __init__(self, args, tag, cpus=2, disk=None, scenario="idle", balloon=False,
                 werror_report=False):
        self.args = args
        self.dir = os.path.join(args.workdir, tag)
        os.makedirs(self.dir, exist_ok=True)
        self.serial = os.path.join(self.dir, "serial.log")
        self.sock = os.path.join(self.dir, "qmp.sock")
        self.name = f"vm-{tag}"
        self.cpus = cpus
        if args.target == "keel":
            cmd = [args.vmm, "--memory", "128", "--cpus", str(cpus),
                   "--cmdline", f"keel.test={scenario}", "--serial", f"file={self.serial}",
                   "--qmp", self.sock, "--name", self.name]
            if disk:
                cmd += ["--disk", f"path={disk},format={disk_format(disk)}"]
            if balloon:
                cmd += ["--balloon"]
        else:
            # No -no-reboot: with it, QEMU 10 turns system_reset into a shutdown.
            cmd = ["qemu-system-x86_64", "-enable-kvm", "-M", "pc", "-cpu", "kvm64",
                   "-m", "128", "-smp", str(cpus), "-display", "none", "-nodefaults", "-serial", f"file:{self.serial}", "-name", self.name,
                   "-qmp", f"unix:{self.sock},server=on,wait=off",
                   "-kernel", args.guest, "-append", f"keel.test={scenario}"]
            if balloon:
                cmd += ["-device", "virtio-balloon-pci"]
            if disk:
                # QEMU's default werror=enospc stops the VM on a full host; keel reports.
                # rerror=stop (no read fails here) turns on QEMU's io-status, and with it
                # BLOCK_IO_ERROR's `nospace`, which keel (whose query-block always has an
                # io-status) always sends.
                werror = ",werror=report,rerror=stop" if werror_report else ""
                cmd += ["-drive",
                        f"file={disk},format={disk_format(disk)},if=none,id=disk0{werror}",
                        "-device", "virtio-blk-pci,drive=disk0"]
        self.stderr = open(os.path.join(self.dir, "stderr.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.stderr)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no QMP socket at {self.sock}: {self.stderr_text()}")
            time.sleep(0.02)

    def stderr_text(self):
        self.stderr.flush()
        with open(self.stderr.name) as f:
            return f.read()

    def output(self):
        try:
            with open(self.serial, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def summary(self):
        """The serial output without tick lines (and the last tick)."""
        lines = self.output().splitlines()
        rest = [line for line in lines if not line.startswith("keel-test: tick ")]
        ticks = self.ticks()
        return "\n".join(rest + [f"(last tick: {ticks[-1] if ticks else None})"])

    def ticks(self):
        return [int(n) for n in re.findall(r"keel-test: tick (\d+)", self.output())]

    async def wait_serial(self, what, cond, timeout=BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while not cond(self.output()):
            if self.proc.poll() is not None:
                raise AssertionError(f"VMM exited ({self.proc.returncode}) waiting for {what}; "
                                     f"serial:\n{self.summary()}\nstderr:\n{self.stderr_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; serial:\n{self.summary()}")
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("the VMM did not exit")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def connect(vm, timeout=10.0):
    """Connects to the VMM's QMP socket. The socket file can exist a moment before the VMM
    listens on it (QEMU binds, then listens), so a refused connection is tried again while
    the VMM runs, up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        qmp = QMPClient(vm.name)
        try:
            await qmp.connect(vm.sock)
            return qmp
        except ConnectError:
            if vm.proc.poll() is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def expect_error(qmp, cmd, args, cls):
    try:
        r = await qmp.execute(cmd, args)
    except ExecuteError as e:
        assert e.error_class == cls, f"{cmd} {args}: {e.error_class} ({e}), expected {cls}"
        return str(e)
    raise AssertionError(f"{cmd} {args} succeeded ({r}); expected {cls}")


async def next_event(listener, name):
    ev = await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
    assert ev["event"] == name, f"expected {name}, got {ev}"
    ts = ev["timestamp"]
    assert ts["seconds"] > 1_600_000_000 and 0 <= ts["microseconds"] < 1_000_000, ev
    return ev


class Raw:
    """A QMP client on a plain socket, for input qemu.qmp would never send."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(EVENT_TIMEOUT)
        self.s.connect(path)
        self.buf = b""
        self.greeting = self.recv()
        assert "QMP" in self.greeting, self.greeting

    def recv(self):
        while b"\n" not in self.buf:
            data = self.s.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, raw):
        self.s.sendall(raw)
        return self.recv()

    def close(self):
        self.s.close()


def error_class(reply):
    assert "error" in reply, reply
    return reply["error"]["class"]


async def check_queries(vm, qmp):
    v = await qmp.execute("query-version")
    assert all(isinstance(v["qemu"][k], int) for k in ("major", "minor", "micro")), v
    names = {c["name"] for c in await qmp.execute("query-commands")}
    wanted = {"qmp_capabilities", "query-version", "query-commands", "query-status",
              "query-name", "query-cpus-fast", "query-balloon", "balloon", "stop", "cont",
              "system_reset", "system_powerdown", "quit"}
    assert wanted <= names, wanted - names
    assert await qmp.execute("query-status") == {"status": "running", "running": True}
    assert await qmp.execute("query-name") == {"name": vm.name}
    cpus = await qmp.execute("query-cpus-fast")
    assert [c["cpu-index"] for c in cpus] == list(range(vm.cpus)), cpus
    assert all(c["thread-id"] > 0 and c["target"] == "x86_64" for c in cpus), cpus
    log(f"queries: version {v['qemu']}, {len(names)} commands, {len(cpus)} vCPUs")


async def check_stop_cont(vm, qmp, disk):
    await vm.wait_serial("tick 3", lambda out: "keel-test: tick 3" in out)
    assert disk_tick(disk) is not None, "the guest does not write its ticks to the disk"
    with qmp.listener() as events:
        await qmp.execute("stop")
        await next_event(events, "STOP")
        assert await qmp.execute("query-status") == {"status": "paused", "running": False}
        await asyncio.sleep(0.3)  # a line being written when the vCPU stopped
        before, on_disk = vm.ticks(), disk_tick(disk)
        await asyncio.sleep(1.5)  # 15 ticks if it were running
        after = vm.ticks()
        assert before == after, f"ticks went on while paused: {before[-3:]} -> {after[-3:]}"
        assert disk_tick(disk) == on_disk, "the disk changed while paused"
        await qmp.execute("stop")  # already stopped: no event, still paused
        assert (await qmp.execute("query-status"))["status"] == "paused"
        await qmp.execute("cont")
        await next_event(events, "RESUME")
        assert await qmp.execute("query-status") == {"status": "running", "running": True}
        last = after[-1]
        await vm.wait_serial("ticks after cont",
                             lambda out: f"keel-test: tick {last + 3}\n" in out, 10)
    assert disk_tick(disk) > on_disk, "the disk did not change after cont"
    log(f"stop/cont: ticks (serial and disk) stood still at {last} for 1.5 s while paused, "
        "then went on")


async def ticks_in(vm, seconds):
    """How many ticks the guest printed in the next `seconds` (at least), and how long
    that really was (a busy host oversleeps)."""
    before = len(vm.ticks())
    start = time.monotonic()
    await asyncio.sleep(seconds)
    return len(vm.ticks()) - before, time.monotonic() - start


async def wr_ops(qmp):
    stats = {s["device"]: s["stats"] for s in await qmp.execute("query-blockstats")}
    return stats["disk0"]


def throttle(iops):
    return {"device": "disk0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
            "iops": iops, "iops_rd": 0, "iops_wr": 0}


async def check_block(vm, qmp, disk):
    blocks = {b["device"]: b for b in await qmp.execute("query-block")}
    b = blocks["disk0"]["inserted"]
    assert b["file"] == disk and b["drv"] == "raw" and not b["ro"], b
    assert b["image"]["virtual-size"] == 16 << 20, b
    assert b["iops"] == 0 and b["bps"] == 0, b
    # The device's own counters follow the guest's writes: one 4 KiB write per tick (the
    # serial log and the query are a few ticks apart at most).
    s1 = await wr_ops(qmp)
    n, _ = await ticks_in(vm, 1.0)
    s2 = await wr_ops(qmp)
    ops = s2["wr_operations"] - s1["wr_operations"]
    assert abs(ops - n) <= 3 and n > 0, f"{ops} writes for {n} ticks"
    assert s2["wr_bytes"] - s1["wr_bytes"] == 4096 * ops, (s1, s2)
    assert s2["wr_total_time_ns"] > s1["wr_total_time_ns"], (s1, s2)
    # Throttled to 2 writes a second, the guest's tick loop (one write a tick) slows
    # down to match: at most 2 a second and the bucket's burst of 2, whatever the window
    # really was; unthrottled it is back to 10 a second (more than twice the throttle is
    # asked, for a busy host).
    free, free_s = await ticks_in(vm, 2.0)
    await qmp.execute("block_set_io_throttle", throttle(2))
    blocks = {b["device"]: b for b in await qmp.execute("query-block")}
    assert blocks["disk0"]["inserted"]["iops"] == 2
    await asyncio.sleep(0.5)  # let the queue settle to the new rate
    s1 = await wr_ops(qmp)
    start = time.monotonic()
    slow, _ = await ticks_in(vm, 3.0)
    s2 = await wr_ops(qmp)
    slow_s = time.monotonic() - start
    slow_ops = s2["wr_operations"] - s1["wr_operations"]
    await qmp.execute("block_set_io_throttle", throttle(0))
    await asyncio.sleep(1.0)  # the guest catches up on the ticks it owes
    again, again_s = await ticks_in(vm, 2.0)
    assert slow_ops <= 2 * slow_s + 3 and slow <= 2 * slow_s + 4, \
        f"throttled to 2 IOPS: {slow_ops} writes, {slow} ticks in {slow_s:.2f} s"
    assert free / free_s > 4.5 and again / again_s > 4.5, \
        f"unthrottled: {free} ticks in {free_s:.2f} s, then {again} in {again_s:.2f} s"
    await expect_error(qmp, "block_set_io_throttle", dict(throttle(1), device="nope"),
                       "DeviceNotFound")
    # Grown to 32 MiB, the guest hears of it through a configuration interrupt.
    assert await qmp.execute("block_resize", {"device": "disk0", "size": 32 << 20}) == {}
    await vm.wait_serial("the guest seeing the new capacity",
                         lambda out: "configuration change: capacity 65536 sectors" in out,
                         EVENT_TIMEOUT)
    blocks = {b["device"]: b for b in await qmp.execute("query-block")}
    assert blocks["disk0"]["inserted"]["image"]["virtual-size"] == 32 << 20
    assert os.path.getsize(disk) == 32 << 20
    await expect_error(qmp, "block_resize", {"device": "nope", "size": 1 << 20},
                       "GenericError")
    log(f"block: query-block, query-blockstats ({ops} writes for {n} ticks); "
        f"throttled to 2 IOPS the guest wrote {slow_ops} times in 3 s, "
        f"{free} and {again} ticks in 2 s unthrottled; block_resize seen by the guest")


async def check_balloon(qmp):
    for cmd, args in (("query-balloon", None), ("balloon", {"value": 64 << 20})):
        msg = await expect_error(qmp, cmd, args, "DeviceNotActive")
        assert "No balloon device has been activated" in msg, msg
    log("balloon: DeviceNotActive without a balloon device")


async def check_bad_input(vm, qmp):
    # Wrong argument types and unknown commands, through the real client.
    await expect_error(qmp, "balloon", {"value": "lots"}, "GenericError")
    await expect_error(qmp, "query-status", {"verbose": True}, "GenericError")
    await expect_error(qmp, "no-such-command", None, "CommandNotFound")
    # What qemu.qmp would never send, on a raw socket (QEMU serves one client at a
    # time: the real client disconnects meanwhile).
    await qmp.disconnect()
    raw = Raw(vm.sock)
    r = raw.send(b'{"execute": "query-status", "id": 1}')
    assert error_class(r) == "CommandNotFound" and r["id"] == 1, r
    assert raw.send(b'{"execute": "qmp_capabilities"}') == {"return": {}}
    assert error_class(raw.send(b'{"execute": "qmp_capabilities"}')) == "CommandNotFound"
    for bad in (b'{"execute": nonsense}', b'[1, 2]', b'"text"', b'{"arguments": {}}',
                b'{"execute": 42}', b'{"execute": "query-status", "arguments": [1]}',
                b'{"execute": "query-status", "colour": "blue"}'):
        assert error_class(raw.send(bad)) == "GenericError", bad
    r = raw.send(b'{"execute": "query-status", "id": {"any": ["json", 1]}}')
    assert r["id"] == {"any": ["json", 1]} and r["return"]["running"], r
    # A message over keel's size limit (1 MiB): an error; keel then drops the client.
    # keel answers before the message ends and closes: sending then fails.
    big = b'{"execute": "query-status", "arguments": {"pad": "' + b"x" * (2 << 20) + b'"}}'
    # QEMU lexes the 2 MiB a character at a time: on a loaded machine that took over 10 s.
    raw.s.settimeout(60)
    try:
        raw.s.sendall(big)
    except (BrokenPipeError, ConnectionResetError):
        assert vm.args.target == "keel"
    assert error_class(raw.recv()) == "GenericError"
    raw.close()
    # Clients vanishing: mid-message, and right after a command.
    for partial in (b'{"execute": "query-st', b'{"execute": "qmp_capabilities"}'
                    b'{"execute": "query-status"}'):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(vm.sock)
        s.sendall(partial)
        s.close()
        await asyncio.sleep(0.1)
    qmp = await connect(vm)
    assert (await qmp.execute("query-status"))["running"]
    n = max(vm.ticks())
    await vm.wait_serial("ticks after bad input",
                         lambda out: f"keel-test: tick {n + 2}\n" in out, 10)
    log("bad input: QMP errors for each, the VM ran on")
    return qmp


async def check_many_clients(vm, qmp):
    """keel only: many clients at once, each negotiating on its own; events reach all."""
    clients = [QMPClient(f"c{i}") for i in range(40)]
    await asyncio.gather(*(c.connect(vm.sock) for c in clients))
    statuses = await asyncio.gather(*(c.execute("query-status") for c in clients))
    assert all(s["running"] for s in statuses)
    raws = [Raw(vm.sock) for _ in range(10)]  # connected, never negotiated
    with contextlib.ExitStack() as stack:
        listeners = [stack.enter_context(c.listener("STOP")) for c in clients]
        await qmp.execute("stop")
        await asyncio.gather(*(next_event(listener, "STOP") for listener in listeners))
    for r in raws:
        # Not negotiated: no event; the next message is the reply to its own command.
        assert error_class(r.send(b'{"execute": "query-status"}')) == "CommandNotFound"
        r.close()
    await qmp.execute("cont")
    await asyncio.gather(*(c.disconnect() for c in clients))
    log("many clients: 40 negotiated clients got STOP, 10 unnegotiated ones did not")


async def check_reset(vm, qmp):
    boots = vm.output().count("keel-test: scenario idle")
    with qmp.listener("RESET") as events:
        await qmp.execute("system_reset")
        ev = await next_event(events, "RESET")
    assert ev["data"] == {"guest": False, "reason": "host-qmp-system-reset"}, ev
    await vm.wait_serial("the guest booting again",
                         lambda out: out.count("keel-test: scenario idle") == boots + 1)
    await vm.wait_serial("tick 2 after the reset",
                         lambda out: "keel-test: tick 2\n" in out.rsplit("scenario idle", 1)[1])
    assert await qmp.execute("query-status") == {"status": "running", "running": True}
    log("system_reset: RESET, the guest booted again and counts from 0")


async def check_powerdown(vm, qmp):
    await vm.wait_serial("the power button armed", lambda out: "power button armed" in out)
    with qmp.listener() as events:
        await qmp.execute("system_powerdown")
        await next_event(events, "POWERDOWN")
        ev = await next_event(events, "SHUTDOWN")
    assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}, ev
    code = await vm.wait_exit()
    assert code == 0, f"exit status {code}"
    assert "power button pressed; powering off (S5)" in vm.output()
    try:
        await qmp.disconnect()
    except EOFError:
        pass  # the VMM is gone
    log("system_powerdown: POWERDOWN, the guest powered off through S5, SHUTDOWN, exit 0")


async def check_quit(args):
    disk = os.path.join(args.workdir, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "16M"], check=True)
    vm = Vm(args, "quit", cpus=1, disk=disk)
    try:
        qmp = await connect(vm)
        await vm.wait_serial("tick 1", lambda out: "keel-test: tick 1\n" in out)
        with qmp.listener("SHUTDOWN") as events:
            assert await qmp.execute("quit") == {}
            ev = await next_event(events, "SHUTDOWN")
        assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}, ev
        code = await vm.wait_exit()
        assert code == 0, f"exit status {code}"
        try:
            await qmp.disconnect()
        except EOFError:
            pass
        last = vm.ticks()[-1]
        check = subprocess.run(["qemu-img", "check", disk], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        info = subprocess.run(["qemu-img", "info", "--output=json", disk],
                              capture_output=True, text=True, check=True)
        dirty = json.loads(info.stdout).get("dirty-flag", False)
        assert not dirty, info.stdout
        raw = os.path.join(args.workdir, "quit.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", disk, raw], check=True)
        # The guest prints a tick, then writes it: quit may fall in between.
        assert disk_tick(raw) in (last - 1, last), f"disk: tick {disk_tick(raw)}, serial {last}"
        log(f"quit: reply, SHUTDOWN, exit 0; the disk is clean (qemu-img check) and holds "
            f"the last tick")
    finally:
        vm.kill()


def fill(path):
    """Fills the file system holding `path` (a new file) to the last byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (b"\xff" * (1 << 20), b"\xff" * 4096, b"\xff"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)


async def check_io_error(args):
    """A host disk full under the guest: BLOCK_IO_ERROR (write, nospace, report), at most
    one a second, for the failed writes; the guest gets IOERR and runs on, and its writes
    succeed again once there is room. The raw image lives on a small tmpfs this check mounts; with the VM stopped,
    block 0 (where the idle guest writes each tick) is punched out of the image and the
    tmpfs filled, so the guest's next write there needs a page the host no longer has."""
    assert os.geteuid() == 0, "the BLOCK_IO_ERROR check mounts a tmpfs: run as root"
    mnt = os.path.join(args.workdir, "full")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "keel-qmp-test", mnt],
                   check=True)
    vm = None
    try:
        disk = os.path.join(mnt, "disk.raw")
        with open(disk, "wb") as f:
            f.truncate(16 << 20)
        vm = Vm(args, "ioerror", cpus=1, disk=disk, werror_report=True)
        qmp = await connect(vm)
        await vm.wait_serial("tick 2", lambda out: "keel-test: tick 2\n" in out)
        assert disk_tick(disk) is not None, "the guest does not write its ticks to the disk"
        filler = os.path.join(mnt, "filler")
        with qmp.listener("BLOCK_IO_ERROR") as events:
            await qmp.execute("stop")
            subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length", "4096",
                            disk], check=True)
            fill(filler)
            before = (await wr_ops(qmp))["failed_wr_operations"]
            await qmp.execute("cont")
            ev = await next_event(events, "BLOCK_IO_ERROR")
            data = ev["data"]
            assert data["device"] == "disk0", ev
            assert (data["operation"], data["action"], data["nospace"]) == \
                ("write", "report", True), ev
            assert data["reason"] == "No space left on device", ev
            # The guest heard IOERR and runs on: more ticks, more failed writes. Events are
            # throttled (QEMU since 9.2: one per device a second, the latest held back
            # meanwhile): 20 ticks (2 s) of a write failing each tick bring 2 or 3 events,
            # where each failure would bring one without the throttle.
            await vm.wait_serial("the guest seeing IOERR",
                                 lambda out: "disk write failed (IOERR)" in out, EVENT_TIMEOUT)
            first = min(int(n) for n in re.findall(
                r"keel-test: tick (\d+): disk write failed", vm.output()))
            await vm.wait_serial("20 more ticks", lambda _: max(vm.ticks()) >= first + 20, 60)
            await asyncio.sleep(0.5)
            assert await qmp.execute("query-status") == {"status": "running", "running": True}
            rest = events.clear()
            for e in rest:
                assert (e["data"]["nospace"], e["data"]["operation"]) == (True, "write"), e
            stamps = [e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
                      for e in [ev] + rest]
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            more = len(stamps)
            failed = (await wr_ops(qmp))["failed_wr_operations"] - before
            assert 2 <= more and failed >= 20 and more * 3 < failed, \
                f"{more} events for {failed} failed writes"
            # One event a second at most: a held event keeps the timestamp of the failure it
            # reports (the latest in its second), so with a failure every 100 ms tick the
            # stamps are 1 s give or take a tick apart (QEMU measured 0.90 s once; a busy
            # host delays ticks). Without the throttle they would be one tick, 0.1 s, apart.
            assert all(g >= 0.4 for g in gaps), f"events closer than one a second: {gaps}"
            # Room again: the next tick's write succeeds and lands on the disk.
            os.unlink(filler)
            last = max(vm.ticks())
            deadline = time.monotonic() + EVENT_TIMEOUT
            while (disk_tick(disk) or 0) <= last:
                assert time.monotonic() < deadline, \
                    f"no write after space was freed: disk tick {disk_tick(disk)}, serial {last}"
                await asyncio.sleep(0.05)
        await qmp.execute("quit")
        assert await vm.wait_exit() == 0
        try:
            await qmp.disconnect()
        except EOFError:
            pass
        log(f"BLOCK_IO_ERROR: the host's tmpfs full from tick {first}: {more} events "
            f"(write, nospace, report; {', '.join(f'{g:.2f}' for g in gaps)} s apart) for "
            f"{failed} failed writes, the guest got IOERR and ran on; with room again, "
            f"tick {disk_tick(disk)} reached the disk")
    finally:
        if vm:
            vm.kill()
        # Right after the VMM exits its image must be closed: keel unregisters the image
        # from its io_uring rings before it exits (a ring's own teardown, later and on a
        # kernel worker, kept the tmpfs busy here).
        subprocess.run(["umount", mnt], check=True)


async def check_balloon_device(args):
    vm = Vm(args, "balloon", cpus=1, scenario="balloon-service", balloon=True)
    try:
        qmp = await connect(vm)
        await vm.wait_serial("the balloon service", lambda out: "power button armed" in out)
        ram = 128 << 20
        assert await qmp.execute("query-balloon") == {"actual": ram}
        with qmp.listener("BALLOON_CHANGE") as events:
            assert await qmp.execute("balloon", {"value": 96 << 20}) == {}
            deadline = time.monotonic() + EVENT_TIMEOUT
            while True:
                ev = await next_event(events, "BALLOON_CHANGE")
                if ev["data"]["actual"] == 96 << 20:
                    break
                assert time.monotonic() < deadline, f"no BALLOON_CHANGE to 96 MiB: {ev}"
        assert await qmp.execute("query-balloon") == {"actual": 96 << 20}
        await vm.wait_serial("the guest's inflate line",
                             lambda out: "actual 8192 pages (32 MiB)" in out, EVENT_TIMEOUT)
        await expect_error(qmp, "balloon", {"value": 0}, "GenericError")
        with qmp.listener() as events:
            await qmp.execute("system_powerdown")
            await next_event(events, "POWERDOWN")
            ev = await next_event(events, "SHUTDOWN")
        assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}, ev
        assert await vm.wait_exit() == 0
        try:
            await qmp.disconnect()
        except EOFError:
            pass
        log("balloon: query-balloon, balloon to 96 MiB (the guest gave 32 MiB), "
            "BALLOON_CHANGE; the balloon service powered off on the power button")
    finally:
        vm.kill()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", choices=["keel", "qemu"], required=True)
    p.add_argument("--vmm", help="the keel binary (--target keel)")
    p.add_argument("--guest", required=True, help="the test guest ELF (--target qemu)")
    p.add_argument("--workdir", required=True)
    args = p.parse_args()

    disk = os.path.join(args.workdir, "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    vm = Vm(args, "main", disk=disk)
    try:
        qmp = await connect(vm)
        await check_queries(vm, qmp)
        await check_stop_cont(vm, qmp, disk)
        await check_balloon(qmp)
        await check_block(vm, qmp, disk)
        qmp = await check_bad_input(vm, qmp)
        if args.target == "keel":
            await check_many_clients(vm, qmp)
        await check_reset(vm, qmp)
        await check_powerdown(vm, qmp)
    finally:
        vm.kill()
    await check_quit(args)
    await check_io_error(args)
    await check_balloon_device(args)
    log("PASS")


if __name__ == "__main__":
    asyncio.run(main())
