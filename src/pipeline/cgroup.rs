//! The memory limit of the exporter's control group (systemd's `MemoryMax=`,
//! a container's memory limit), checked at start against what the buffers
//! may take: a configuration whose buffers cannot fit would be killed by the
//! kernel's OOM killer at the first large poll, so it does not start.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::pipeline::netlinker::pool_capacity;

/// Room left for everything but the buffers: code, stacks, metrics, the
/// allocator's slack. The process takes 5 to 9 MiB at any socket count
/// (docs/performance.md), so twice the most.
pub const HEADROOM: u64 = 16 << 20;

/// What the buffers of `config` may take at most: each dump's receive
/// buffers (its pool's capacity, each of the buffer size), each
/// inetdiager's UDP batch, and the closer's.
pub fn buffer_bound(config: &Config) -> u64 {
    let closer = config.close_buffer.map_or(0, |_| config.udp_batch_bytes) as u64;
    let families: u64 = config
        .dumps()
        .iter()
        .map(|f| {
            let pool = pool_capacity(config, f) as u64 * config.recv_buffer_len() as u64;
            pool + (f.inetdiagers * config.udp_batch_bytes) as u64
        })
        .sum();
    families + closer
}

/// `Err` with one line when the buffers of `config` plus [`HEADROOM`] do
/// not fit this process's memory limit.
pub fn check_fits(config: &Config) -> Result<(), String> {
    let Some(limit) = memory_limit() else {
        return Ok(());
    };
    let bound = buffer_bound(config);
    if bound + HEADROOM <= limit {
        return Ok(());
    }
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    Err(format!(
        "the buffers may take {:.1} MiB (--channel-size {} and the threads' buffers of {} bytes, \
         per dump) and the process {:.0} MiB more, over the {:.1} MiB memory limit of its \
         control group (MemoryMax=): lower --channel-size or --packet-size, or raise the limit",
        mib(bound),
        config.channel_size,
        config.recv_buffer_len(),
        mib(HEADROOM),
        mib(limit)
    ))
}

/// The memory limit of this process's control group and its ancestors, if
/// any: cgroup v2 (`memory.max`) or v1 (`hierarchical_memory_limit`).
pub fn memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    limit_of(&own, Path::new("/sys/fs/cgroup"))
}

/// [`memory_limit`] with `/proc/self/cgroup`'s text and the mount point.
fn limit_of(proc_cgroup: &str, root: &Path) -> Option<u64> {
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            let stat = std::fs::read_to_string(root.join("memory").join(path).join("memory.stat"))
                .or_else(|_| std::fs::read_to_string(root.join("memory/memory.stat")))
                .ok()?;
            return stat
                .lines()
                .find_map(|l| l.strip_prefix("hierarchical_memory_limit "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                // "Unlimited" is the largest page-aligned i64.
                .filter(|&v| v < 1 << 62);
        }
        if controllers.is_empty() && root.join("cgroup.controllers").exists() {
            return v2_limit(root, &root.join(path));
        }
    }
    None
}

/// The smallest `memory.max` from `dir` up to `root` (a parent's limit
/// bounds its children).
fn v2_limit(root: &Path, dir: &Path) -> Option<u64> {
    let mut dir: PathBuf = dir.to_path_buf();
    let mut limit: Option<u64> = None;
    while dir.starts_with(root) {
        if let Ok(text) = std::fs::read_to_string(dir.join("memory.max")) {
            if let Ok(v) = text.trim().parse::<u64>() {
                limit = Some(limit.map_or(v, |l| l.min(v)));
            }
        }
        if !dir.pop() {
            break;
        }
    }
    limit
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory laid out like /sys/fs/cgroup.
    struct Root(PathBuf);

    impl Root {
        fn new(name: &str) -> Root {
            let dir =
                std::env::temp_dir().join(format!("xtcp-cgroup-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Root(dir)
        }

        fn write(&self, path: &str, text: &str) {
            let file = self.0.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
        }
    }

    impl Drop for Root {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn v1_reads_the_hierarchical_limit() {
        let root = Root::new("v1");
        root.write(
            "memory/system.slice/xtcp.service/memory.stat",
            "cache 0\nhierarchical_memory_limit 134217728\n",
        );
        let own = "5:devices:/\n4:memory:/system.slice/xtcp.service\n0::/\n";
        assert_eq!(limit_of(own, &root.0), Some(128 << 20));
        root.write(
            "memory/system.slice/xtcp.service/memory.stat",
            "hierarchical_memory_limit 9223372036854771712\n",
        );
        assert_eq!(limit_of(own, &root.0), None, "unlimited");
    }

    #[test]
    fn v2_takes_the_smallest_limit_up_the_tree() {
        let root = Root::new("v2");
        root.write("cgroup.controllers", "memory pids\n");
        root.write("system.slice/memory.max", "268435456\n");
        root.write("system.slice/xtcp.service/memory.max", "max\n");
        let own = "0::/system.slice/xtcp.service\n";
        assert_eq!(limit_of(own, &root.0), Some(256 << 20));
        root.write("system.slice/xtcp.service/memory.max", "134217728\n");
        assert_eq!(limit_of(own, &root.0), Some(128 << 20));
        root.write("system.slice/memory.max", "max\n");
        root.write("system.slice/xtcp.service/memory.max", "max\n");
        assert_eq!(limit_of(own, &root.0), None);
    }
}
