//! `--processes`: which processes hold each socket, from their file
//! descriptors (`/proc/PID/fd/N` is a link to `socket:[INODE]`, the inode
//! `inet_diag_msg` carries).
//!
//! `ss -p` reads every descriptor of every process on every run. Here the
//! descriptors are remembered by process and number between scans. A poll
//! that has a socket inode the table lacks scans once (the first such
//! record's thread scans, the others of the poll wait for it): each
//! process's `stat` (its name, and its start time to tell a reused PID),
//! the list of its `fd` directory, and only the descriptors whose number
//! is new. A number can be reused between scans (a server closes one
//! connection and accepts the next on the same number), so a socket that
//! scan did not find makes every descriptor of its cgroup's processes read
//! again (`cgroup.procs`; every process when the socket's cgroup is not
//! known), once per cgroup and poll. An inode not found even so (held in
//! another PID namespace) is not looked for again. Sockets without an inode
//! (TIME_WAIT, SYN_RECV, orphans) have no process, and say so.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use prometheus::{IntCounter, IntGauge};

use super::published::{Published, Reader};

/// Most inodes remembered as held by no visible process.
const GIVEN_UP_MAX: usize = 1 << 20;

/// Holders listed in a record; `process_count` says how many there are.
pub const MAX_LISTED: usize = 64;
/// A command as /proc/PID/stat gives it: at most 15 bytes, each of which
/// may be invalid UTF-8 and read as a 3-byte replacement character.
pub const MAX_COMMAND_LEN: usize = 15 * 3;
/// `PID/COMMAND,` for each listed holder, PIDs of at most 10 digits.
pub const MAX_PROCESSES_LEN: usize = MAX_LISTED * (10 + 1 + MAX_COMMAND_LEN + 1);

/// The holders of one socket, ready to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holders {
    /// The lowest PID holding it, and its command.
    pub pid: u32,
    pub command: Box<str>,
    /// The first [`MAX_LISTED`] holders, `PID/COMMAND`, by PID,
    /// comma-separated.
    pub listed: Box<str>,
    pub count: u32,
}

/// What a record says about its socket's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    Found(&'a Holders),
    /// No inode: TIME_WAIT, SYN_RECV, an orphan.
    NoInode,
    /// An inode no process this exporter can see holds.
    NotFound,
}

/// Where the table's work shows.
#[derive(Clone)]
pub struct ProcessMetrics {
    pub sockets: IntGauge,
    pub scans: IntCounter,
    pub descriptors_read: IntCounter,
    pub not_found: IntCounter,
}

/// One process as the last scan saw it.
struct Process {
    start_time: u64,
    command: Arc<str>,
    /// Descriptor number -> the inode of the socket it held (0: not a
    /// socket).
    fds: HashMap<u32, u32>,
}

#[derive(Default)]
struct ScanState {
    processes: HashMap<u32, Process>,
    /// The last poll a scan ran for.
    scanned_poll: u64,
    /// Cgroups whose processes had every descriptor read for that poll.
    read_whole: HashSet<Box<str>>,
    /// Inodes that a whole read of their cgroup did not find: looked for no
    /// more.
    given_up: HashSet<u32>,
}

/// Socket inode -> holders, shared by the writing threads.
pub struct ProcessTable {
    proc: PathBuf,
    /// Where cgroup2 is mounted, to list a cgroup's processes.
    cgroup_root: Option<PathBuf>,
    table: Published<HashMap<u32, Holders>>,
    scan: Mutex<ScanState>,
    metrics: ProcessMetrics,
}

impl ProcessTable {
    /// The table of the processes under `proc` (`/proc`), scanned once now;
    /// `cgroup_root` lets a scan read a cgroup's processes whole.
    pub fn new(proc: PathBuf, cgroup_root: Option<PathBuf>, metrics: ProcessMetrics) -> Self {
        let table = ProcessTable {
            proc,
            cgroup_root,
            table: Published::default(),
            scan: Mutex::default(),
            metrics,
        };
        let mut state = table.scan.lock().unwrap_or_else(|e| e.into_inner());
        table.rescan(&mut state);
        drop(state);
        table
    }

    /// A reader for one thread.
    pub fn view(self: &Arc<Self>) -> ProcessView {
        ProcessView {
            table: self.table.reader(),
            shared: Arc::clone(self),
        }
    }

    /// For a record of poll `poll_id` naming `inode` (of the cgroup at
    /// `cgroup`, when known), absent from the table: the poll's scan of new
    /// descriptors, if none ran yet (others wait for the one running), then
    /// if that did not find it a read of every descriptor of the cgroup's
    /// processes, once per cgroup and poll. Whether the table changed.
    fn missing(&self, inode: u32, cgroup: Option<&str>, poll_id: u64) -> bool {
        let mut state = self.scan.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        if state.scanned_poll < poll_id {
            state.scanned_poll = poll_id;
            state.read_whole.clear();
            self.rescan(&mut state);
            changed = true;
        }
        if self.table.current().contains_key(&inode) || state.given_up.contains(&inode) {
            return changed;
        }
        // Without the socket's cgroup, every process is read whole.
        let scope = match (&self.cgroup_root, cgroup) {
            (Some(root), Some(path)) => Some(root.join(path.trim_start_matches('/'))),
            _ => None,
        };
        if state.read_whole.insert(cgroup.unwrap_or("").into()) {
            let pids: Vec<u32> = match scope {
                Some(dir) => fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.parse().ok())
                    .collect(),
                None => self.pids().collect(),
            };
            let mut read = 0;
            for pid in pids {
                read += self.scan_process(&mut state, pid, true).unwrap_or(0);
            }
            self.install(&state.processes);
            self.metrics.descriptors_read.inc_by(read);
            changed = true;
        }
        if !self.table.current().contains_key(&inode) {
            // Bounded: past it, forget and look again.
            if state.given_up.len() >= GIVEN_UP_MAX {
                state.given_up.clear();
            }
            state.given_up.insert(inode);
        }
        changed
    }

    /// Brings every process's descriptors up to date, reading those whose
    /// number is new, and installs the new table.
    fn rescan(&self, state: &mut ScanState) {
        let mut seen = HashSet::new();
        let mut read = 0u64;
        for pid in self.pids() {
            if let Some(n) = self.scan_process(state, pid, false) {
                read += n;
                seen.insert(pid);
            }
        }
        state.processes.retain(|pid, _| seen.contains(pid));
        self.install(&state.processes);
        self.metrics.scans.inc();
        self.metrics.descriptors_read.inc_by(read);
    }

    /// Every process under `proc`.
    fn pids(&self) -> impl Iterator<Item = u32> {
        fs::read_dir(&self.proc)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    }

    /// Updates process `pid` (its name, its descriptors: those with a new
    /// number, or `every` one) and returns how many descriptors it read;
    /// `None` when the process is gone.
    fn scan_process(&self, state: &mut ScanState, pid: u32, every: bool) -> Option<u64> {
        let dir = self.proc.join(pid.to_string());
        let (command, start_time) = stat(&dir)?;
        let fresh = || Process {
            start_time,
            command: command.clone().into(),
            fds: HashMap::new(),
        };
        let process = state.processes.entry(pid).or_insert_with(fresh);
        if process.start_time != start_time {
            *process = fresh();
        }
        if *process.command != *command {
            process.command = command.into();
        }
        // No permission (another user's, without CAP_SYS_PTRACE): none seen.
        let Ok(entries) = fs::read_dir(dir.join("fd")) else {
            return Some(0);
        };
        let mut listed = HashSet::new();
        let mut read = 0;
        for fd in entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            listed.insert(fd);
            if every || !process.fds.contains_key(&fd) {
                read += 1;
                let inode = fs::metadata(dir.join("fd").join(fd.to_string()))
                    .ok()
                    .filter(|m| m.file_type().is_socket())
                    .map_or(0, |m| m.ino() as u32);
                process.fds.insert(fd, inode);
            }
        }
        process.fds.retain(|fd, _| listed.contains(fd));
        Some(read)
    }

    fn install(&self, processes: &HashMap<u32, Process>) {
        let mut holders: HashMap<u32, Vec<(u32, &str)>> = HashMap::new();
        for (&pid, p) in processes {
            for &inode in p.fds.values().filter(|&&i| i != 0) {
                holders.entry(inode).or_default().push((pid, &p.command));
            }
        }
        let table: HashMap<u32, Holders> = holders
            .into_iter()
            .map(|(inode, mut list)| {
                list.sort_unstable();
                list.dedup();
                let listed: Vec<String> = list
                    .iter()
                    .take(MAX_LISTED)
                    .map(|(pid, c)| format!("{pid}/{c}"))
                    .collect();
                let holders = Holders {
                    pid: list[0].0,
                    command: list[0].1.into(),
                    listed: listed.join(",").into(),
                    count: list.len() as u32,
                };
                (inode, holders)
            })
            .collect();
        self.metrics.sockets.set(table.len() as i64);
        self.table.replace(table);
    }
}

/// `(command, start time)` from `/proc/PID/stat`: the name between the
/// first `(` and the last `)` (it may hold either), the start time the
/// 20th field after it.
fn stat(dir: &std::path::Path) -> Option<(String, u64)> {
    let bytes = fs::read(dir.join("stat")).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let command = text.get(open + 1..close)?.to_string();
    let start_time = text[close + 1..].split_whitespace().nth(19)?.parse().ok()?;
    Some((command, start_time))
}

/// One thread's reader of a [`ProcessTable`].
pub struct ProcessView {
    shared: Arc<ProcessTable>,
    table: Reader<HashMap<u32, Holders>>,
}

impl Clone for ProcessView {
    /// A clone reads the newest table.
    fn clone(&self) -> Self {
        self.shared.view()
    }
}

impl std::fmt::Debug for ProcessView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessView")
            .field("sockets", &self.table.len())
            .finish()
    }
}

impl ProcessView {
    /// The holders of the socket `inode` (of the cgroup at path `cgroup`)
    /// seen in poll `poll_id`; scans (or waits for the poll's scan) when the
    /// table lacks it and `may_scan`.
    pub fn holders(
        &mut self,
        inode: u32,
        cgroup: Option<&str>,
        poll_id: u64,
        may_scan: bool,
    ) -> Lookup<'_> {
        if inode == 0 {
            return Lookup::NoInode;
        }
        self.table.refresh(&self.shared.table);
        let absent = !self.table.contains_key(&inode);
        if absent && may_scan && self.shared.missing(inode, cgroup, poll_id) {
            self.table.refresh(&self.shared.table);
        }
        match self.table.get(&inode) {
            Some(h) => Lookup::Found(h),
            None => {
                self.shared.metrics.not_found.inc();
                Lookup::NotFound
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn metrics() -> ProcessMetrics {
        ProcessMetrics {
            sockets: IntGauge::new("s", "s").unwrap(),
            scans: IntCounter::new("c", "c").unwrap(),
            descriptors_read: IntCounter::new("d", "d").unwrap(),
            not_found: IntCounter::new("n", "n").unwrap(),
        }
    }

    fn inode_of(fd: &impl AsRawFd) -> u32 {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        fs::metadata(path).unwrap().ino() as u32
    }

    #[test]
    fn reads_the_name_and_start_time_of_any_command() {
        let dir = tempfile::tempdir().unwrap();
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 777 1 1";
        fs::write(dir.path().join("stat"), line).unwrap();
        assert_eq!(stat(dir.path()), Some(("a (b) c".to_string(), 777)));
        fs::write(dir.path().join("stat"), "42 (x").unwrap();
        assert_eq!(stat(dir.path()), None);
    }

    /// The test process's cgroup, as a path from the cgroup2 root.
    fn own_cgroup() -> (Option<PathBuf>, Option<String>) {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = crate::attribution::find_cgroup2_root(&mountinfo);
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_string);
        (root, path)
    }

    #[test]
    fn finds_this_process_s_sockets_whatever_reused_their_numbers() {
        let m = metrics();
        let (root, cgroup) = own_cgroup();
        let table = Arc::new(ProcessTable::new("/proc".into(), root, m.clone()));
        let mut view = table.view();
        let pid = std::process::id();
        // Made after the first scan, perhaps on a number another test of
        // this process closed since: found in the poll it is first seen.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = inode_of(&listener);
        let Lookup::Found(h) = view.holders(inode, cgroup.as_deref(), 1, true) else {
            panic!("not found");
        };
        assert_eq!((h.pid, h.count), (pid, 1));
        assert!(h.listed.contains(&format!("{pid}/")), "{h:?}");
        assert_eq!(m.scans.get(), 2);
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let client = inode_of(&client);
        assert!(matches!(
            view.holders(client, cgroup.as_deref(), 2, true),
            Lookup::Found(_)
        ));
        assert_eq!(view.holders(0, cgroup.as_deref(), 2, true), Lookup::NoInode);
        // Closes never scan.
        assert_eq!(view.holders(u32::MAX, None, 3, false), Lookup::NotFound);
        assert_eq!((m.scans.get(), m.not_found.get()), (3, 1));
    }

    #[test]
    fn an_inode_nobody_holds_is_looked_for_once() {
        let m = metrics();
        let (root, cgroup) = own_cgroup();
        let table = Arc::new(ProcessTable::new("/proc".into(), root, m.clone()));
        let mut view = table.view();
        let nobody = u32::MAX - 1;
        let before = m.descriptors_read.get();
        assert_eq!(
            view.holders(nobody, cgroup.as_deref(), 1, true),
            Lookup::NotFound
        );
        let whole = m.descriptors_read.get() - before;
        assert!(whole > 0);
        let before = m.descriptors_read.get();
        assert_eq!(
            view.holders(nobody, cgroup.as_deref(), 2, true),
            Lookup::NotFound
        );
        // Poll 2 only scanned for new numbers: less than poll 1's whole read.
        assert!(m.descriptors_read.get() - before < whole);
        assert_eq!(m.scans.get(), 3);
    }
}
