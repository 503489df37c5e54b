//! The cgroup id -> [`Owner`] map: the cgroup2 tree, walked at start and
//! again when a socket's id is unknown, at most once per `--cgroup-rescan`.
//!
//! On cgroup2 a cgroup's id is its directory's inode number, so a walk
//! (`readdir` and `stat` of every directory) maps every id to its path. A
//! walk keeps at most `--cgroup-cache` cgroups, the shallowest first, and
//! skips paths over [`MAX_CGROUP_PATH_LEN`]; what it left out is counted.
//!
//! Lookups run in every record-writing thread, so a walk's result is an
//! immutable [`Tree`], published for each thread's [`CgroupView`] to read
//! without a lock. An
//! unknown id is a miss (counted, its record has no path). It starts a walk
//! only if none ran for `--cgroup-rescan` and none is running (the thread
//! does not wait for another's), and only once per id: an id a walk newer
//! than its first miss did not find (a cgroup removed while its sockets
//! live on) is remembered and starts no more walks, so that sockets of
//! removed cgroups cannot keep the exporter walking the tree.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};

use super::published::{Published, Reader};
use super::Owner;

/// Longest cgroup path kept (PATH_MAX); a deeper cgroup is left out.
pub const MAX_CGROUP_PATH_LEN: usize = 4096;

/// Where the cache's work shows.
#[derive(Clone)]
pub struct CgroupMetrics {
    pub known: IntGauge,
    pub left_out: IntGauge,
    pub walks: IntCounter,
    pub misses: IntCounter,
}

/// One walk's map.
#[derive(Default)]
struct Tree {
    owners: HashMap<u64, Owner>,
}

/// What a walk decides under its lock.
struct WalkState {
    last: Instant,
    /// Ids a walk after their first miss did not find.
    absent: HashSet<u64>,
}

/// The shared map; each thread reads it through its own [`CgroupView`].
pub struct CgroupCache {
    root: PathBuf,
    limit: usize,
    rescan: Duration,
    tree: Published<Tree>,
    walk: Mutex<WalkState>,
    metrics: CgroupMetrics,
}

/// The cgroup2 mount point, from a `/proc/self/mountinfo` text: the first
/// `cgroup2` mount of the hierarchy's root (`/sys/fs/cgroup` on a unified
/// host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn find_cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER
        let (mount, fs) = line.split_once(" - ")?;
        let fields: Vec<&str> = mount.split(' ').collect();
        let (root, point) = (*fields.get(3)?, *fields.get(4)?);
        let cgroup2 = fs.split(' ').next() == Some("cgroup2") && root == "/";
        cgroup2.then(|| PathBuf::from(unescape_octal(point)))
    })
}

/// mountinfo writes a space, tab, newline and backslash in a path as `\NNN`.
fn unescape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 4)
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

impl CgroupCache {
    /// Walks the tree under `root` once, keeping at most `limit` cgroups.
    pub fn new(root: PathBuf, limit: usize, rescan: Duration, metrics: CgroupMetrics) -> Self {
        let cache = CgroupCache {
            root,
            limit,
            rescan,
            tree: Published::default(),
            walk: Mutex::new(WalkState {
                last: Instant::now(),
                absent: HashSet::new(),
            }),
            metrics,
        };
        cache.install(cache.walk_tree());
        cache
    }

    /// A reader for one thread.
    pub fn view(self: &Arc<Self>) -> CgroupView {
        CgroupView {
            tree: self.tree.reader(),
            cache: Arc::clone(self),
        }
    }

    fn install(&self, tree: Tree) {
        self.metrics.known.set(tree.owners.len() as i64);
        self.tree.replace(tree);
        self.metrics.walks.inc();
    }

    /// Counts a miss of `id` and walks the tree again if that is due;
    /// whether a new tree was installed.
    fn miss(&self, id: u64) -> bool {
        self.metrics.misses.inc();
        // Another thread walking: this record goes without its path.
        let Ok(mut state) = self.walk.try_lock() else {
            return false;
        };
        if state.absent.contains(&id) || state.last.elapsed() < self.rescan {
            return false;
        }
        let tree = self.walk_tree();
        state.last = Instant::now();
        if !tree.owners.contains_key(&id) {
            // Bounded like the tree: past it, forget and start over.
            if state.absent.len() >= self.limit {
                state.absent.clear();
            }
            state.absent.insert(id);
        }
        drop(state);
        self.install(tree);
        true
    }

    /// Every cgroup under the root, breadth first, up to the limit.
    fn walk_tree(&self) -> Tree {
        let mut tree = Tree::default();
        let mut left_out = 0usize;
        let mut queue = VecDeque::from([(self.root.clone(), String::from("/"))]);
        while let Some((dir, path)) = queue.pop_front() {
            // A cgroup removed while walked is simply not there.
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            if tree.owners.len() >= self.limit || path.len() > MAX_CGROUP_PATH_LEN {
                left_out += 1;
                continue;
            }
            tree.owners.insert(meta.ino(), Owner::of_path(&path));
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let child = if path == "/" {
                        format!("/{name}")
                    } else {
                        format!("{path}/{name}")
                    };
                    queue.push_back((entry.path(), child));
                }
            }
        }
        self.metrics.left_out.set(left_out as i64);
        tree
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// One thread's reader of a [`CgroupCache`].
pub struct CgroupView {
    cache: Arc<CgroupCache>,
    tree: Reader<Tree>,
}

impl Clone for CgroupView {
    /// A clone reads the newest tree.
    fn clone(&self) -> Self {
        self.cache.view()
    }
}

impl CgroupView {
    /// The owner of cgroup `id`; `None` (counted) when the tree has no
    /// such cgroup even after a walk that was due.
    pub fn owner(&mut self, id: u64) -> Option<&Owner> {
        self.tree.refresh(&self.cache.tree);
        if !self.tree.owners.contains_key(&id) && self.cache.miss(id) {
            self.tree.refresh(&self.cache.tree);
        }
        self.tree.owners.get(&id)
    }
}

impl std::fmt::Debug for CgroupView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CgroupView")
            .field("root", &self.cache.root)
            .field("cgroups", &self.tree.owners.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> CgroupMetrics {
        CgroupMetrics {
            known: IntGauge::new("k", "k").unwrap(),
            left_out: IntGauge::new("l", "l").unwrap(),
            walks: IntCounter::new("w", "w").unwrap(),
            misses: IntCounter::new("m", "m").unwrap(),
        }
    }

    #[test]
    fn finds_the_cgroup2_mount_of_unified_and_hybrid_hosts() {
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2_root(unified), Some("/sys/fs/cgroup".into()));
        let hybrid = "\
25 23 0:22 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/memory rw shared:11 - cgroup cgroup rw,memory
";
        assert_eq!(
            find_cgroup2_root(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        // A container's view: its own cgroup bound at the mount point is
        // not the hierarchy's root, and a path with a space.
        let nested = "\
40 30 0:26 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw
41 30 0:26 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw
";
        assert_eq!(find_cgroup2_root(nested), Some("/mnt/my cgroups".into()));
        assert_eq!(
            find_cgroup2_root("27 25 0:24 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    /// A tree of directories standing in for cgroup2 (ids are inodes on
    /// any file system).
    fn tree() -> (tempfile::TempDir, u64, u64) {
        let dir = tempfile::tempdir().unwrap();
        let service = dir.path().join("system.slice/a.service");
        fs::create_dir_all(&service).unwrap();
        let slice = fs::metadata(dir.path().join("system.slice")).unwrap().ino();
        (dir, slice, fs::metadata(&service).unwrap().ino())
    }

    #[test]
    fn maps_ids_to_paths_and_walks_again_only_when_due() {
        let (dir, slice, service) = tree();
        let m = metrics();
        let cache = Arc::new(CgroupCache::new(
            dir.path().into(),
            100,
            Duration::ZERO,
            m.clone(),
        ));
        let mut view = cache.view();
        let root = fs::metadata(dir.path()).unwrap().ino();
        assert_eq!(&*view.owner(root).unwrap().path, "/");
        assert_eq!(&*view.owner(slice).unwrap().path, "/system.slice");
        let owner = view.owner(service).unwrap();
        assert_eq!(&*owner.path, "/system.slice/a.service");
        assert_eq!(&*owner.systemd_unit, "a.service");
        assert_eq!((m.known.get(), m.walks.get(), m.misses.get()), (3, 1, 0));

        // A cgroup made after the walk: the miss walks again and finds it.
        let new = dir.path().join("system.slice/b.service");
        fs::create_dir(&new).unwrap();
        let new_id = fs::metadata(&new).unwrap().ino();
        assert_eq!(
            &*view.owner(new_id).unwrap().path,
            "/system.slice/b.service"
        );
        assert_eq!((m.known.get(), m.walks.get(), m.misses.get()), (4, 2, 1));

        // An id no walk finds walks once, then only counts.
        for _ in 0..3 {
            assert!(view.owner(u64::MAX).is_none());
        }
        assert_eq!((m.walks.get(), m.misses.get()), (3, 4));
        // Another thread's view sees the newest tree.
        assert!(cache.view().owner(new_id).is_some());
    }

    #[test]
    fn a_walk_is_not_due_before_the_rescan_interval() {
        let (dir, _, _) = tree();
        let m = metrics();
        let cache = Arc::new(CgroupCache::new(
            dir.path().into(),
            100,
            Duration::from_secs(3600),
            m.clone(),
        ));
        let new = dir.path().join("c");
        fs::create_dir(&new).unwrap();
        let id = fs::metadata(&new).unwrap().ino();
        assert!(cache.view().owner(id).is_none());
        assert_eq!((m.walks.get(), m.misses.get()), (1, 1));
    }

    #[test]
    fn keeps_the_shallowest_cgroups_up_to_the_limit() {
        let (dir, slice, service) = tree();
        let m = metrics();
        let cache = Arc::new(CgroupCache::new(
            dir.path().into(),
            2,
            Duration::ZERO,
            m.clone(),
        ));
        assert_eq!((m.known.get(), m.left_out.get()), (2, 1));
        let mut view = cache.view();
        assert!(view.owner(slice).is_some());
        assert!(view.owner(service).is_none());
    }
}
