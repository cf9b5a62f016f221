//! `pgswitch demo` as a newcomer runs it: the whole upgrade on throwaway
//! servers, ending with a switched cutover and fallback, zero client errors,
//! zero rows lost, and nothing left behind; Ctrl-C cleans up too.
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// The folder and the servers' ports the demo announced.
fn site(output: &str) -> (String, Vec<u16>) {
    let dir = output
        .lines()
        .find_map(|l| l.strip_prefix("pgswitch demo: working in "))
        .unwrap_or_else(|| panic!("no working folder in: {output}"))
        .to_owned();
    let ports = output
        .lines()
        .find(|l| l.starts_with("pgswitch demo: blue on "))
        .map(|l| {
            l.split("127.0.0.1:")
                .skip(1)
                .filter_map(|p| p.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    (dir, ports)
}

fn assert_gone(dir: &str, ports: &[u16], output: &str) {
    assert!(
        !std::path::Path::new(dir).exists(),
        "{dir} is left: {output}"
    );
    assert_eq!(ports.len(), 2, "{output}");
    for port in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", *port)).is_err(),
            "a server still listens on {port}: {output}"
        );
    }
}

#[test]
fn demo_switches_both_ways_without_errors_and_cleans_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .arg("demo")
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{output}");
    for expected in [
        "prepared: green replicates blue, every table ready",
        "cutover blue -> green: SWITCHED",
        "fallback green -> blue: SWITCHED",
        " 0 client errors,",
        " 0 rows lost",
        "dashboard http://127.0.0.1:",
        "done: OK",
        "phases (* inside the pause):",
        "   *drain",
        "held at the gate:",
        "target lsn:",
        "(on blue)",
    ] {
        assert!(output.contains(expected), "{expected:?} not in: {output}");
    }
    assert_eq!(
        output.matches("2 table(s), 0 differ").count(),
        2,
        "{output}"
    );
    if pg17_bin_dir().is_some() {
        assert!(
            output.contains("blue: PostgreSQL 15, green: PostgreSQL 17"),
            "{output}"
        );
    }
    let (dir, ports) = site(&output);
    assert_gone(&dir, &ports, &output);
}

#[test]
fn ctrl_c_removes_what_the_demo_made() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Interrupted once pgswitch serves (servers, folder and proxy exist).
    let mut output = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !output.contains("dashboard http://") {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("the demo never started pgswitch: {output}"));
        output.push_str(&line);
        output.push('\n');
    }
    assert!(send_signal(child.id(), 2));
    let status = child.wait().unwrap();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        output.push_str(&line);
        output.push('\n');
    }
    assert_eq!(status.code(), Some(130), "{output}");
    let (dir, ports) = site(&output);
    assert_gone(&dir, &ports, &output);
}

/// `--keep` leaves blue, green and pgswitch running and prints how to reach
/// and stop them; the printed commands work: pgswitch answers through its
/// psql line, and the stop commands leave nothing behind.
#[test]
fn keep_leaves_it_running_and_the_printed_commands_stop_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args(["demo", "--keep"])
        .output()
        .unwrap();
    let output = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{output}");
    let (dir, ports) = site(&output);
    assert!(std::path::Path::new(&dir).exists(), "{output}");
    let line = |label: &str| {
        output
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(label))
            .map(|l| l.trim().to_owned())
            .unwrap_or_else(|| panic!("no {label:?} line: {output}"))
    };
    // The printed stop commands, run at the end, also when a check fails.
    struct Stop(Vec<String>);
    impl Drop for Stop {
        fn drop(&mut self) {
            for command in &self.0 {
                let ok = Command::new("bash")
                    .args(["-c", command])
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok || std::thread::panicking(), "{command} failed");
            }
        }
    }
    let stop = Stop(
        output
            .lines()
            .skip_while(|l| !l.starts_with("To stop it:"))
            .skip(1)
            .take_while(|l| !l.starts_with("pgswitch demo:"))
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
    );
    assert_eq!(stop.0.len(), 4, "{output}");
    let psql_bin = format!("{}/psql", pg15_bin_dir().display());
    let through = line("pgswitch:").replacen("psql", &psql_bin, 1);
    let answer = Command::new("bash")
        .args([
            "-c",
            &format!("{through} -Atc 'SELECT count(*) > 0 FROM orders'"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answer.stdout).trim(),
        "t",
        "{}",
        String::from_utf8_lossy(&answer.stderr)
    );
    drop(stop);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ports
        .iter()
        .any(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_gone(&dir, &ports, &output);
}
