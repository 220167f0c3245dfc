//! What a process tree costs, read from /proc: CPU time (per-thread schedstat, nanoseconds) and
//! memory (Pss from smaps_rollup, so pages shared between nginx's processes count once).

use std::fs;

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let path = t.path().join("children");
                if let Ok(children) = fs::read_to_string(path) {
                    out.extend(
                        children
                            .split_whitespace()
                            .filter_map(|c| c.parse::<u32>().ok()),
                    );
                }
            }
        }
        i += 1;
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// CPU time of every thread of `pids`, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let mut ns: u64 = 0;
    for p in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    ns as f64 / 1e9
}

/// Summed Pss of `pids`, in KiB.
pub fn pss_kib(pids: &[u32]) -> u64 {
    smaps_kib(pids, "Pss:")
}

/// Summed anonymous Pss of `pids` (heap, stacks), in KiB: what connection state costs, without
/// file pages (the binary's text), whose share changes when other processes map the same file or
/// the kernel reclaims them.
pub fn pss_anon_kib(pids: &[u32]) -> u64 {
    smaps_kib(pids, "Pss_Anon:")
}

fn smaps_kib(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}
