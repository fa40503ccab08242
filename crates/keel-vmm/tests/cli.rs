//! The command line: every bad value is one line on stderr and exit status 2.

mod support;

use std::time::Duration;

use support::run_keel;

#[test]
fn bad_values_are_one_line_errors_with_status_2() {
    for (args, needle) in [
        (vec!["--memory", "abc"], "--memory"),
        (vec!["--memory", "1"], "--memory"),
        (vec!["--cpus", "0"], "--cpus"),
        (vec!["--cpus", "300"], "--cpus"),
        (vec!["--serial", "tty"], "expected stdio, file=PATH or none"),
        (vec!["--serial", "file="], "--serial"),
        (
            vec!["--serial", "file=log,limit=lots"],
            "limit: expected a number",
        ),
        (
            vec!["--serial", "file=log,limit=99999999999G"],
            "limit: expected a number",
        ),
        // A path cannot hold a comma: the rest is options (it made a file "log,bogus=1").
        (
            vec!["--serial", "file=log,bogus=1"],
            "'bogus=1': unknown or repeated serial option",
        ),
        (
            vec!["--serial", "file=log,limit=1M,limit=2M"],
            "'limit=2M': unknown or repeated serial option",
        ),
        (vec!["--disk", "path=a,path=b"], "path: given twice"),
        (vec!["--frobnicate"], "--frobnicate"),
        (vec!["--kernel"], "--kernel"),
        (vec!["--seccomp", "maybe"], "--seccomp"),
        (vec!["--seccomp"], "--seccomp"),
        (vec!["--seccomp-selftest", "gpu"], "--seccomp-selftest"),
        (
            vec!["--net", "mac=52:54:00:12:34:56"],
            "exactly one of tap=NAME",
        ),
        (
            vec!["--net", "tap=t0,socket=/tmp/s"],
            "exactly one of tap=NAME",
        ),
        (
            vec!["--net", "tap=t0,mtu=20"],
            "mtu=20: expected 68 to 65535",
        ),
        (
            vec!["--net", "tap=t0,mac=ff:ff:ff:ff:ff:ff"],
            "mac=ff:ff:ff:ff:ff:ff",
        ),
        (vec!["--net", "tap=t0,queues=99"], "queues=99"),
        (vec!["--net", "socket=/tmp/s,queues=2"], "only with tap="),
        (
            vec!["--net", "tap=t0,pps=many"],
            "pps=many: expected a number",
        ),
        (vec!["--net", "tap=t0,vhost=on"], "unknown net option"),
    ] {
        let mut all = vec!["--kernel", "/nonexistent"];
        all.extend(args.iter());
        let out = run_keel(&all, Duration::from_secs(10));
        assert_eq!(out.code(), Some(2), "{all:?}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{all:?}: {}", out.stderr);
        assert!(out.stderr.starts_with("keel: "), "{}", out.stderr);
        assert!(out.stderr.contains(needle), "{all:?}: {}", out.stderr);
    }
}

#[test]
fn missing_or_unbootable_kernel_is_a_clear_error() {
    let out = run_keel(
        &["--kernel", "/nonexistent/vmlinux"],
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr
            .contains("cannot read kernel /nonexistent/vmlinux"),
        "{}",
        out.stderr
    );
    let out = run_keel(
        &["--kernel", env!("CARGO_MANIFEST_DIR")],
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
}

#[test]
fn help_documents_every_flag() {
    let out = run_keel(&["--help"], Duration::from_secs(10));
    assert_eq!(out.code(), Some(0));
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--memory",
        "--cpus",
        "--serial",
        "--qmp",
        "--qmp-fd",
        "--name",
        "--debug-exit",
        "--seccomp",
        "--net",
    ] {
        assert!(out.stdout.contains(flag), "{flag} missing from --help");
    }
    assert!(out.stdout.contains("Exit status"), "{}", out.stdout);
}

/// A network backend that cannot be opened: one line naming the option and why, status 1,
/// before the guest runs.
#[test]
fn a_missing_tap_or_descriptor_is_a_clear_error() {
    for (net, needles) in [
        (
            "tap=nosuchtap7",
            &[
                "net tap=nosuchtap7",
                "there is no network interface \"nosuchtap7\"",
            ][..],
        ),
        (
            "fd=987",
            &["net fd=987: cannot duplicate the descriptor"][..],
        ),
        // Standard input is not a tap (the message named keel's duplicate of it).
        ("fd=0", &["net fd=0: not a tap opened with"][..]),
        (
            "socket=/nonexistent-dir/net.sock",
            &["net socket=/nonexistent-dir/net.sock", "cannot bind"][..],
        ),
    ] {
        let out = run_keel(&["--net", net, "--serial", "none"], Duration::from_secs(20));
        assert_eq!(out.code(), Some(1), "{net}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{net}: {}", out.stderr);
        assert!(out.stderr.starts_with("keel: "), "{}", out.stderr);
        for n in needles {
            assert!(out.stderr.contains(n), "{net}: {}", out.stderr);
        }
    }
}
