//! The few system calls and `/proc` reads the kernel benchmark needs beyond aya: batched map
//! updates and deletes (filling millions of sessions one syscall per entry takes minutes),
//! the kernel's memory accounting of a map, the boot clock the program stamps sessions with,
//! CPU pinning, and how much memory is left.

use std::{
    fs, io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
    path::Path,
};

use anyhow::{anyhow, bail, Context, Result};

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h; stable ABI).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr` (the kernel zero-fills the rest of the union).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Inserts (or overwrites) `keys[i] -> values[i]` with `BPF_MAP_UPDATE_BATCH`. Batched
/// updates take no `BPF_NOEXIST`, so callers make sure keys are distinct.
///
/// `K` and `V` must be exactly the map's key and value sizes: callers pass the fd of a map they
/// checked (see `bench_fill::ConntrackMaps`). The map must not be per-CPU (values are read as
/// one `V` each).
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len()).map_err(|_| io::Error::other("batch too large"))?;
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_MAP_UPDATE_BATCH attribute: `keys` and `values` point at
    // `count` contiguous keys and values of the map's sizes (the caller's contract), which the
    // kernel only reads, and only during the call.
    unsafe { batch_call(BPF_MAP_UPDATE_BATCH, &mut attr, "entries") }
}

/// Runs one batch command on `attr`, reporting how far it got on failure.
///
/// # Safety
/// `attr` must be a valid batch attribute for `cmd`: its pointers must reference `attr.count`
/// keys (and values, where the command reads them) of the map's sizes, alive for the call.
unsafe fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr, what: &str) -> io::Result<()> {
    let count = attr.count;
    // SAFETY: the caller's contract; the kernel writes back only `attr.count`, which we own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>(),
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    Err(io::Error::new(
        err.kind(),
        format!("{err} after {} of {count} {what}", attr.count),
    ))
}

/// Deletes `keys` with `BPF_MAP_DELETE_BATCH`; every key must be present (`ENOENT`
/// otherwise, with the keys before it deleted).
pub fn delete_batch<K: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len()).map_err(|_| io::Error::other("batch too large"))?;
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: 0,
        count,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: as in `update_batch`; a delete reads only the `count` keys.
    unsafe { batch_call(BPF_MAP_DELETE_BATCH, &mut attr, "keys") }
}

/// The `map_elem` member of `union bpf_attr`, as `BPF_MAP_GET_NEXT_KEY` reads it.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// The key after `key` in a hash map (the first one for `None`), `None` at the end. `K` must
/// be exactly the map's key size (as for [`update_batch`]).
pub fn next_key<K: aya::Pod>(fd: BorrowedFd<'_>, key: Option<&K>) -> io::Result<Option<K>> {
    // SAFETY: any bit pattern is a valid Pod; the kernel overwrites it on success.
    let mut next: K = unsafe { std::mem::zeroed() };
    let mut attr = NextKeyAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.map_or(0, |k| std::ptr::from_ref(k) as u64),
        next_key: std::ptr::from_mut(&mut next) as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_MAP_GET_NEXT_KEY attribute: `key` (or NULL) points at one
    // key the kernel reads and `next_key` at one key it writes, both alive for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_GET_NEXT_KEY,
            std::ptr::from_mut(&mut attr),
            size_of::<NextKeyAttr>(),
        )
    };
    if ret == 0 {
        return Ok(Some(next));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    Err(err)
}

/// The kernel's memory accounting of the BPF object behind `fd` (the `memlock:` line of
/// `/proc/self/fdinfo/<fd>`): for a hash map, its buckets and every preallocated element.
pub fn memlock_bytes(fd: BorrowedFd<'_>) -> Result<u64> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .ok_or_else(|| anyhow!("{path} has no memlock line"))?
        .trim()
        .parse()
        .with_context(|| format!("{path}: memlock is not a number"))
}

/// `CLOCK_BOOTTIME` in nanoseconds: the clock of `bpf_ktime_get_boot_ns`, which stamps
/// sessions, so synthetic entries look as fresh as the ones the program writes.
pub fn boottime_ns() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return Err(io::Error::last_os_error()).context("clock_gettime(CLOCK_BOOTTIME)");
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Number of CPUs this process may run on.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pins the calling thread to `cpu`: BPF_PROG_TEST_RUN runs the program on the caller's CPU,
/// and one CPU for every run keeps caches and the hash maps' per-CPU free lists alike.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET only writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * size_of::<libc::cpu_set_t>() {
        bail!("CPU {cpu} is out of range");
    }
    // SAFETY: `cpu` is within the set's size (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("pinning the benchmark to CPU {cpu}"));
    }
    Ok(())
}

/// Pins thread or process `pid` to `cpu` (the NAPI threads of the topology benchmark).
pub fn pin_pid_to_cpu(pid: i32, cpu: usize) -> Result<()> {
    if cpu >= 8 * size_of::<libc::cpu_set_t>() {
        bail!("CPU {cpu} is out of range");
    }
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET only writes inside it (checked).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is within the set's size (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("pinning pid {pid} to CPU {cpu}"));
    }
    Ok(())
}

/// Gives thread `pid` (0: the calling thread) the real-time policy `SCHED_FIFO` at `priority`.
/// The topology benchmark's receive threads and generator use it so that, on a machine
/// shared with other work, the threads measured get the CPU when they have packets (the
/// kernel's real-time throttling still leaves others 5% of every second).
pub fn set_fifo(pid: i32, priority: i32) -> Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: a valid sched_param for the duration of the call.
    let rc = unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("SCHED_FIFO {priority} for pid {pid}"));
    }
    Ok(())
}

/// Bytes of memory this process can still take: `MemAvailable` of `/proc/meminfo`, or less
/// when its memory cgroup has a tighter limit (BPF maps are charged to the creator's cgroup).
pub fn available_memory() -> Result<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("/proc/meminfo has no readable MemAvailable line"))?;
    let mut available = kib * 1024;
    if let Some(room) = cgroup_room()? {
        available = available.min(room);
    }
    Ok(available)
}

/// Limit minus usage of this process's memory cgroup (v2 or v1), if it has a limit.
fn cgroup_room() -> Result<Option<u64>> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let dir = if controllers.split(',').any(|c| c == "memory") {
            Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'))
        } else if controllers.is_empty() {
            Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'))
        } else {
            continue;
        };
        let read = |name: &str| -> Option<u64> {
            fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        // v1 names first, then v2; "max" (v2, unlimited) does not parse and counts as none.
        let limit = read("memory.limit_in_bytes").or_else(|| read("memory.max"));
        let usage = read("memory.usage_in_bytes").or_else(|| read("memory.current"));
        if let (Some(limit), Some(usage)) = (limit, usage) {
            // v1 reports "no limit" as a huge page-aligned number.
            if limit < (1 << 60) {
                return Ok(Some(limit.saturating_sub(usage)));
            }
        }
    }
    Ok(None)
}

/// `/proc/cpuinfo`'s first `model name` (what the numbers were measured on).
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_facts_are_readable() {
        assert!(online_cpus() >= 1);
        assert!(!cpu_model().is_empty());
        assert_ne!(kernel_release(), "unknown");
        assert!(available_memory().unwrap() > 0);
        assert!(boottime_ns().unwrap() > 0);
    }
}
