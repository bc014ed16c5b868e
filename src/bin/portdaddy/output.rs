//! What the commands print: escaped text, aligned tables, ages and JSON; and whether there
//! was anywhere to print it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portdaddy::{Lease, LeaseState, SocketHolder, Stats};
use serde_json::{json, Value};
use unicode_width::UnicodeWidthStr;

pub(crate) use crate::text::escape;
use crate::text::needs_escape;

/// Whether standard output was closed when the process started (`>&-`).
///
/// Rust's runtime opens `/dev/null` in place of a closed standard descriptor before `main`
/// runs, so that writing the output would succeed and go nowhere. This is recorded before
/// that, by a function the loader runs on start (`.init_array`). Elsewhere than on Linux it
/// is not known, and false.
pub fn stdout_closed_at_start() -> bool {
    crate::sys::stdout_closed_at_start()
}

/// `value` as one line of JSON in which no character can steer a terminal either: serde_json
/// escapes the C0 controls, and the rest (DEL, the C1 controls such as the one-byte CSI, line
/// separators, bidirectional controls) are written as `\uXXXX` too, which every JSON
/// reader turns back into the same text.
pub fn json_text(value: &Value) -> String {
    let mut out = String::new();
    for c in value.to_string().chars() {
        if needs_escape(c) {
            // All of them lie in the Basic Multilingual Plane: one \u escape each.
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Rows under a header, each column padded to its widest cell; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.width()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.width());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(w.saturating_sub(cell.width())));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A duration as a person reads it at a glance: `45s`, `12m`, `3h`, `2d`.
pub fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// How long ago `t` was (`0s` for a time in the future).
pub fn age(now: SystemTime, t: SystemTime) -> String {
    short(now.duration_since(t).unwrap_or_default())
}

/// When `t` comes: `in 10m`, or `2m ago` once past.
pub fn until(now: SystemTime, t: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(d) => format!("in {}", short(d)),
        Err(e) => format!("{} ago", short(e.duration())),
    }
}

/// Ports from `first` to `last` as the commands print them: `20000`, or `20000-20003`.
pub fn span(first: u16, last: u16) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// A lease's ports: `20000`, or `20000-20003` for a block.
fn port_span(lease: &Lease) -> String {
    span(*lease.ports().start(), *lease.ports().end())
}

/// A lease's ports in a sentence: `port 20000`, or `ports 20000-20003` for a block.
pub fn ports_phrase(lease: &Lease) -> String {
    let ports = lease.ports();
    let noun = if ports.start() == ports.end() {
        "port"
    } else {
        "ports"
    };
    format!("{noun} {}", port_span(lease))
}

/// One row of `portdaddy list`.
pub fn lease_row(lease: &Lease, state: LeaseState, now: SystemTime) -> Vec<String> {
    vec![
        port_span(lease),
        protocol(lease).to_owned(),
        escape(lease.name()),
        lease
            .pid()
            .map_or_else(|| "-".to_owned(), |p| p.to_string()),
        age(now, lease.acquired_at()),
        lease
            .expires_at()
            .map_or_else(|| "-".to_owned(), |t| until(now, t)),
        state.to_string(),
    ]
}

/// The columns of `portdaddy list`.
pub const LEASE_HEADER: &[&str] = &["PORT", "PROTO", "NAME", "PID", "AGE", "EXPIRES", "STATE"];

fn protocol(lease: &Lease) -> &'static str {
    protocol_name(lease.protocol())
}

/// A lease as a JSON object: `port` (the first, with `block_len` ports from there), `name`,
/// `pid` (null when detached), `protocol`, `state`, `acquired_at` and `expires_at` (RFC 3339,
/// UTC, whole seconds; `expires_at` is null only for a lease without expiry), `age_secs`.
pub fn lease_json(lease: &Lease, state: LeaseState, now: SystemTime) -> Value {
    json!({
        "port": lease.port(),
        "block_len": lease.block_len(),
        "name": lease.name(),
        "pid": lease.pid(),
        "protocol": protocol(lease),
        "state": state.as_str(),
        "acquired_at": rfc3339(lease.acquired_at()),
        "expires_at": lease.expires_at().map(rfc3339),
        "age_secs": now.duration_since(lease.acquired_at()).unwrap_or_default().as_secs(),
    })
}

/// A process with a socket on a port as a JSON object: `pid` (null for a process that cannot
/// be seen), `command` (null if unreadable), `protocol` (`tcp` or `udp`).
pub fn holder_json(holder: &SocketHolder) -> Value {
    json!({
        "pid": holder.pid,
        "command": holder.command,
        "protocol": protocol_name(holder.protocol),
    })
}

fn protocol_name(protocol: portdaddy::Protocol) -> &'static str {
    match protocol {
        portdaddy::Protocol::Udp => "udp",
        portdaddy::Protocol::Both => "tcp+udp",
        _ => "tcp",
    }
}

/// What `portdaddy who` prints: the lease, then the processes.
pub fn who_text(
    port: u16,
    lease: Option<&(Lease, LeaseState)>,
    holders: Option<&[SocketHolder]>,
    now: SystemTime,
) -> String {
    let mut out = match lease {
        Some((lease, state)) => {
            let owner = lease
                .pid()
                .map_or_else(|| "detached".to_owned(), |p| format!("pid {p}"));
            format!(
                "lease: {} on {} ({owner}, {state}, age {})\n",
                escape(lease.name()),
                ports_phrase(lease),
                age(now, lease.acquired_at())
            )
        }
        None => format!("lease: none on port {port}\n"),
    };
    match holders {
        None => out.push_str(&format!(
            "processes: cannot tell on this system which processes have a socket on port \
             {port}\n"
        )),
        Some([]) => out.push_str(&format!(
            "processes: none with a listening TCP socket or a UDP socket on port {port}\n"
        )),
        Some(holders) => {
            let rows: Vec<Vec<String>> = holders
                .iter()
                .map(|h| {
                    vec![
                        h.pid.map_or_else(|| "?".to_owned(), |p| p.to_string()),
                        protocol_name(h.protocol).to_owned(),
                        match (h.pid, &h.command) {
                            (None, _) => "a process we cannot see (another user's, or hidden \
                                          by hidepid)"
                                .to_owned(),
                            (Some(_), Some(command)) => escape(command),
                            (Some(_), None) => "(command unreadable)".to_owned(),
                        },
                    ]
                })
                .collect();
            out.push_str(&table(&["PID", "PROTO", "COMMAND"], &rows));
        }
    }
    out
}

/// The counters and lease counts in the Prometheus text exposition format (version 0.0.4),
/// each sample labelled with the registry's path.
pub fn prometheus(stats: &Stats, registry: &std::path::Path) -> String {
    let label = format!(
        "registry=\"{}\"",
        prometheus_label_value(&registry.to_string_lossy())
    );
    let mut out = String::new();
    let counters = [
        (
            "portdaddy_leases_acquired_total",
            "Leases handed out.",
            stats.acquired,
        ),
        (
            "portdaddy_leases_released_total",
            "Leases ended by their holder, or released by port or name.",
            stats.released,
        ),
        (
            "portdaddy_leases_reaped_total",
            "Leases reclaimed because their owner had died or their expiry had passed.",
            stats.reaped,
        ),
        (
            "portdaddy_claims_exhausted_total",
            "Claims that failed because no port of the range was free.",
            stats.exhausted,
        ),
        (
            "portdaddy_claims_failed_total",
            "Claims that failed for another reason (a required port taken, a registry error).",
            stats.errors,
        ),
    ];
    for (name, help, value) in counters {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{label}}} {value}\n"
        ));
    }
    out.push_str(
        "# HELP portdaddy_leases Leases in the registry now, by state (stale: owner dead or \
         expired, not yet reclaimed).\n# TYPE portdaddy_leases gauge\n",
    );
    for (state, value) in [
        ("live", stats.live),
        ("detached", stats.detached),
        ("stale", stats.stale),
    ] {
        out.push_str(&format!(
            "portdaddy_leases{{{label},state=\"{state}\"}} {value}\n"
        ));
    }
    out
}

/// A label value as the exposition format escapes it: backslash, double quote and line feed.
fn prometheus_label_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The last second RFC 3339 can write, 9999-12-31T23:59:59Z, after the Unix epoch.
pub const LATEST: Duration = Duration::from_secs(253_402_300_799);

/// `t` in RFC 3339 (UTC, whole seconds, rounded down), before 1970 too. A year outside
/// 0000-9999, which RFC 3339 cannot write (a registry written by hand or by a clock gone
/// wild can hold one), is written with a sign as ISO 8601's expanded years are:
/// `+10000-01-01T00:00:00Z`. Every time the registry can hold has a text.
fn rfc3339(t: SystemTime) -> String {
    // Whole seconds since the epoch, rounded down (towards the past) before it too.
    let secs: i128 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::from(d.as_secs()),
        Err(e) => {
            let d = e.duration();
            -i128::from(d.as_secs()) - i128::from(d.subsec_nanos() > 0)
        }
    };
    let (days, second) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let (h, m, s) = (second / 3600, second / 60 % 60, second % 60);
    let year = if (0..=9999).contains(&year) {
        format!("{year:04}")
    } else {
        format!("{year:+05}")
    };
    format!("{year}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i128) -> (i128, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i128::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_every_steering_character_and_reads_back_the_same() {
        let name = "a\u{7f}b\u{9b}2J\u{202e}c\u{2028}\u{1b}d";
        let text = json_text(&json!({ "name": name }));
        assert!(!text.chars().any(needs_escape), "{text}");
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["name"], name);
    }

    #[test]
    fn escapes_what_could_steer_a_terminal() {
        assert_eq!(escape("plain näme"), "plain näme");
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_eq!(escape("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(escape("evil\u{202E}txt"), "evil\\u{202e}txt");
    }

    #[test]
    fn columns_line_up_with_wide_characters() {
        let rows = vec![
            vec!["1".to_owned(), "日本".to_owned(), "x".to_owned()],
            vec!["22".to_owned(), "ab".to_owned(), "y".to_owned()],
        ];
        let text = table(&["A", "NAME", "Z"], &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "A   NAME  Z");
        assert_eq!(lines[1], "1   日本  x");
        assert_eq!(lines[2], "22  ab    y");
    }

    #[test]
    fn every_time_has_a_text_before_1970_and_after_9999_too() {
        let last = UNIX_EPOCH + LATEST;
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(last), "9999-12-31T23:59:59Z");
        assert_eq!(
            rfc3339(last + Duration::from_millis(999)),
            "9999-12-31T23:59:59Z"
        );
        assert_eq!(
            rfc3339(last + Duration::from_secs(1)),
            "+10000-01-01T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_millis(1)),
            "1969-12-31T23:59:59Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(86_400 * 366)),
            "1968-12-31T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(62_167_219_201)),
            "-0001-12-31T23:59:59Z"
        );
        // Agrees with humantime wherever that can write the time.
        for secs in [0, 59, 86_399, 1_700_000_000, 4_102_444_800, 253_402_300_799] {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(rfc3339(t), humantime::format_rfc3339_seconds(t).to_string());
        }
    }

    #[test]
    fn prometheus_label_values_escape_backslash_quote_and_newline() {
        assert_eq!(prometheus_label_value("a\\b\"c\nd"), r#"a\\b\"c\nd"#);
        assert_eq!(prometheus_label_value("/tmp/ü r"), "/tmp/ü r");
    }

    #[test]
    fn a_span_of_one_port_is_the_port_and_of_more_the_first_and_last() {
        assert_eq!(span(20000, 20000), "20000");
        assert_eq!(span(20000, 20003), "20000-20003");
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(short(Duration::from_secs(59)), "59s");
        assert_eq!(short(Duration::from_secs(600)), "10m");
        assert_eq!(short(Duration::from_secs(7200)), "2h");
        assert_eq!(short(Duration::from_secs(2 * 86400)), "2d");
    }
}
