//! The sandbox of a child process: resource limits for every `exec` and process-plugin stage,
//! and, for process plugins, Landlock filesystem rules and a seccomp filter on sockets.
//!
//! This module owns everything that touches the child between `fork` and `exec`:
//!
//! - [`Limits`]: `address_space`, `cpu_seconds` and `open_files`, from a manifest's `[limits]`
//!   or a stage's `limits = { ... }`, applied with `setrlimit`;
//! - Landlock (plugin stages): the plugin's directory, the system directories and the
//!   program's own prefix readable and executable; `/` readable with `filesystem.read`; the
//!   pipeline's directory and `/tmp` writable with `filesystem.write`, otherwise only
//!   `/dev/null`; from ABI 6 also no signals to processes outside the plugin's own (the engine
//!   included) and, without `network`, no abstract UNIX sockets outside them;
//! - seccomp (plugin stages without `network`): `socket()` for any family but `AF_UNIX`, and
//!   `io_uring_setup()` (whose `IORING_OP_SOCKET` would go around it), fail with `EACCES`;
//! - [`support`]: what this kernel offers, for warnings and for `millrace plugins inspect`.
//!
//! Everything that allocates or can fail in an interesting way (the ruleset and path file
//! descriptors, the BPF program, the clamped limits) is prepared in the parent by
//! `ChildSetup::prepare`; the `pre_exec` hook only makes async-signal-safe system calls
//! (`setrlimit`, `prctl`, `landlock_restrict_self`) on that prepared data.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sync::statics::OnceLock;

/// The keys of a `limits` table.
pub(crate) const LIMIT_KEYS: &[&str] = &["address_space", "cpu_seconds", "open_files"];

/// Resource limits for a child process (`setrlimit`); `None` leaves the engine's own limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct Limits {
    /// Largest virtual address space in bytes (`RLIMIT_AS`): allocations beyond it fail.
    pub address_space: Option<u64>,
    /// CPU seconds (`RLIMIT_CPU`): SIGXCPU at the limit, SIGKILL one second later.
    pub cpu_seconds: Option<u64>,
    /// Largest file descriptor number plus one (`RLIMIT_NOFILE`).
    pub open_files: Option<u64>,
}

/// A value in a `limits` table that is not what it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError {
    /// The key (`cpu_seconds`).
    pub key: String,
    /// What was expected and found.
    pub message: String,
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`limits.{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for LimitError {}

impl Limits {
    /// Reads a `limits` table: unknown keys and values of the wrong type or range are errors.
    pub fn from_table(t: &toml::Table) -> Result<Limits, LimitError> {
        let mut l = Limits::default();
        for (key, v) in t {
            let err = |expected: &str| LimitError {
                key: key.clone(),
                message: format!(
                    "expected {expected}, found {}",
                    crate::describe::describe_toml(v)
                ),
            };
            match key.as_str() {
                "address_space" => {
                    let expected = "a size of at least 1 MiB (bytes as an integer, or a string such as \"512MiB\" or \"2GiB\")";
                    let n = match v {
                        toml::Value::Integer(i) => u64::try_from(*i).ok(),
                        toml::Value::String(s) => parse_size(s),
                        _ => None,
                    };
                    l.address_space =
                        Some(n.filter(|n| *n >= 1 << 20).ok_or_else(|| err(expected))?);
                }
                "cpu_seconds" | "open_files" => {
                    let n = match v {
                        toml::Value::Integer(i) if *i >= 1 => *i as u64,
                        _ => return Err(err("an integer of at least 1")),
                    };
                    if key == "cpu_seconds" {
                        l.cpu_seconds = Some(n);
                    } else {
                        l.open_files = Some(n);
                    }
                }
                other => {
                    return Err(LimitError {
                        key: other.to_string(),
                        message: format!("unknown limit (known: {})", LIMIT_KEYS.join(", ")),
                    })
                }
            }
        }
        Ok(l)
    }

    /// These limits, each unset one taken from `base` (a stage's over its manifest's).
    pub fn or(self, base: &Limits) -> Limits {
        Limits {
            address_space: self.address_space.or(base.address_space),
            cpu_seconds: self.cpu_seconds.or(base.cpu_seconds),
            open_files: self.open_files.or(base.open_files),
        }
    }

    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

impl TryFrom<toml::Table> for Limits {
    type Error = LimitError;
    fn try_from(t: toml::Table) -> Result<Self, LimitError> {
        Limits::from_table(&t)
    }
}

impl fmt::Display for Limits {
    /// `address_space = 256 MiB, cpu_seconds = 1`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(b) = self.address_space {
            parts.push(format!("address_space = {}", show_size(b)));
        }
        if let Some(n) = self.cpu_seconds {
            parts.push(format!("cpu_seconds = {n}"));
        }
        if let Some(n) = self.open_files {
            parts.push(format!("open_files = {n}"));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// `"512MiB"`, `"2 GiB"`, `"4096"`, `"1024B"`: bytes (binary units only, so nothing is
/// ambiguous).
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let shift = match s[digits..].trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// Bytes in the largest binary unit that divides them exactly (`256 MiB`, `1536 KiB`).
pub(crate) fn show_size(b: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if b >= 1 << shift && b % (1 << shift) == 0 {
            return format!("{} {unit}", b >> shift);
        }
    }
    format!("{b} bytes")
}

/// What a process plugin stage may do, from its manifest and grants.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// The plugin's directory: always readable and executable.
    pub plugin_dir: PathBuf,
    /// The pipeline's directory: writable (with `/tmp`) when `filesystem.write` is granted.
    pub write_dir: PathBuf,
    /// `filesystem.read` granted: everything readable.
    pub fs_read: bool,
    /// `filesystem.write` granted.
    pub fs_write: bool,
    /// `network` granted: no socket filter.
    pub network: bool,
}

/// What this kernel (and build) offers the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Support {
    /// The Landlock ABI version, or why there is none.
    pub landlock: Result<u32, String>,
    /// Whether seccomp filters can be installed, or why not.
    pub seccomp: Result<(), String>,
}

impl fmt::Display for Support {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.landlock {
            Ok(v) => write!(f, "landlock: ABI {v}")?,
            Err(why) => write!(f, "landlock: not supported ({why})")?,
        }
        match &self.seccomp {
            Ok(()) => write!(f, "; seccomp: yes"),
            Err(why) => write!(f, "; seccomp: not supported ({why})"),
        }
    }
}

/// What this kernel offers, probed once: the Landlock ABI version and whether seccomp filters
/// can be installed (and are built for this architecture).
pub fn support() -> &'static Support {
    static SUPPORT: OnceLock<Support> = OnceLock::new();
    SUPPORT.get_or_init(|| Support {
        landlock: landlock::abi(),
        seccomp: seccomp::available(),
    })
}

/// What `millrace plugins inspect` says of a native plugin.
pub const NATIVE_NOT_SANDBOXED: &str =
    "native plugins run inside the engine process and cannot be sandboxed";

/// The sandbox a process plugin with `permissions` and manifest `limits` gets on a kernel with
/// `support`, one line per feature (for `millrace plugins inspect`).
pub fn describe_process(limits: &Limits, permissions: &[String], support: &Support) -> Vec<String> {
    let has = |p: &str| permissions.iter().any(|x| x == p);
    let mut out = vec![
        format!("limits: {limits} (from the manifest; a stage's `limits` overrides each key)"),
        "process: its own process group, environment cleared to PATH, HOME, LANG, LC_ALL, TZ, \
         TMPDIR, USER, working directory the plugin's"
            .to_string(),
    ];
    let read = if has("filesystem.read") {
        "reads everywhere (filesystem.read)"
    } else {
        "reads only its directory, its program's and the system directories (no filesystem.read)"
    };
    let write = if has("filesystem.write") {
        "writes under the pipeline's directory and /tmp (filesystem.write)"
    } else {
        "writes nowhere but /dev/null (no filesystem.write)"
    };
    out.push(match &support.landlock {
        Ok(abi) if *abi >= 6 => format!(
            "landlock (ABI {abi} on this kernel): {read}; {write}; no signals to processes outside the plugin's own"
        ),
        Ok(abi) => format!("landlock (ABI {abi} on this kernel): {read}; {write}"),
        Err(why) => format!(
            "landlock: not supported on this kernel ({why}): the filesystem is not restricted"
        ),
    });
    out.push(match (&support.seccomp, has("network")) {
        (_, true) => "seccomp: none (network requested: sockets allowed)".to_string(),
        (Ok(()), false) => {
            "seccomp: socket() other than AF_UNIX and io_uring_setup() fail with EACCES (no network)"
                .to_string()
        }
        (Err(why), false) => format!(
            "seccomp: not supported here ({why}): sockets are not filtered although network is not requested"
        ),
    });
    out
}

/// Everything a child needs between `fork` and `exec`, prepared in the parent.
#[derive(Debug)]
pub(crate) struct ChildSetup {
    /// `(resource, limit)` pairs, already clamped to the engine's hard limits.
    rlimits: Vec<(libc::c_int, libc::rlimit)>,
    /// A Landlock ruleset with every rule added (close-on-exec: the program never sees it).
    landlock: Option<OwnedFd>,
    /// A seccomp BPF program.
    seccomp: Option<Box<[libc::sock_filter]>>,
    /// Sandbox features that apply but could not be set up here, in words, for a warning.
    pub missing: Vec<String>,
}

impl ChildSetup {
    /// Prepares the limits and, for a plugin stage (`policy`), its Landlock ruleset and seccomp
    /// program; `program` is the command's first word, found on `path` (the child's `PATH`)
    /// relative to `cwd`. Features `support` lacks are skipped and listed in `missing`.
    pub(crate) fn prepare(
        limits: &Limits,
        policy: Option<&Policy>,
        program: &str,
        path: Option<&OsString>,
        cwd: Option<&Path>,
        support: &Support,
    ) -> io::Result<ChildSetup> {
        let mut setup = ChildSetup {
            rlimits: rlimits(limits),
            landlock: None,
            seccomp: None,
            missing: Vec::new(),
        };
        let Some(policy) = policy else {
            return Ok(setup);
        };
        match &support.landlock {
            Ok(abi) => {
                let dirs = program_dirs(program, path, cwd);
                setup.landlock = Some(landlock::ruleset(*abi, policy, &dirs)?);
            }
            Err(why) => setup.missing.push(format!(
                "Landlock is not available on this kernel ({why}): the filesystem is not restricted"
            )),
        }
        if !policy.network {
            match &support.seccomp {
                Ok(()) => setup.seccomp = seccomp::program(),
                Err(why) => setup.missing.push(format!(
                    "seccomp is not available ({why}): sockets are not filtered although `network` is not granted"
                )),
            }
        }
        Ok(setup)
    }

    /// Whether there is nothing to do in the child (std can then use `posix_spawn`).
    pub(crate) fn is_empty(&self) -> bool {
        self.rlimits.is_empty() && self.landlock.is_none() && self.seccomp.is_none()
    }

    /// Applies the setup in the child, between `fork` and `exec`: the limits, then
    /// `PR_SET_NO_NEW_PRIVS`, then the Landlock ruleset, then the seccomp filter.
    ///
    /// # Safety
    ///
    /// Only to be called in a freshly forked child (from `CommandExt::pre_exec`). It makes
    /// async-signal-safe system calls only, reads `self` without allocating or locking, and
    /// restricts the calling process for good.
    pub(crate) unsafe fn apply_in_child(&self) -> io::Result<()> {
        for (resource, limit) in &self.rlimits {
            // SAFETY: setrlimit reads the rlimit struct behind the pointer, which is alive.
            if unsafe { libc::setrlimit(*resource as _, limit) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if self.landlock.is_none() && self.seccomp.is_none() {
            return Ok(());
        }
        // SAFETY: prctl with integer arguments only; required before an unprivileged process
        // may restrict itself, and inherited by everything it starts.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(fd) = &self.landlock {
            // SAFETY: landlock_restrict_self takes a ruleset fd (alive: owned by `self`) and
            // flags; no memory is passed.
            let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(filter) = &self.seccomp {
            let prog = libc::sock_fprog {
                len: filter.len() as libc::c_ushort,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: the kernel copies the program `prog` points to (alive for the call);
            // it does not write through the pointer despite its type.
            let r = unsafe {
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// A `pre_exec` hook that applies this setup.
    pub(crate) fn hook(self: Arc<Self>) -> impl FnMut() -> io::Result<()> + Send + Sync + 'static {
        // SAFETY: the hook runs in the forked child, which is what apply_in_child requires.
        move || unsafe { self.apply_in_child() }
    }
}

/// The limits as `setrlimit` arguments, clamped to the engine's own hard limits (an
/// unprivileged process cannot raise those). CPU gets its hard limit a second after the soft
/// one, so that the child first receives SIGXCPU and then SIGKILL if it ignores it.
fn rlimits(l: &Limits) -> Vec<(libc::c_int, libc::rlimit)> {
    let mut out = Vec::new();
    let mut add = |resource: libc::c_int, soft: Option<u64>, extra: u64| {
        let Some(soft) = soft else { return };
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: getrlimit writes into `cur`, a live local.
        unsafe { libc::getrlimit(resource as _, &mut cur) };
        let max = cur.rlim_max;
        let hard = soft.saturating_add(extra).min(max);
        out.push((
            resource,
            libc::rlimit {
                rlim_cur: soft.min(hard),
                rlim_max: hard,
            },
        ));
    };
    add(libc::RLIMIT_AS as libc::c_int, l.address_space, 0);
    add(libc::RLIMIT_CPU as libc::c_int, l.cpu_seconds, 1);
    add(libc::RLIMIT_NOFILE as libc::c_int, l.open_files, 0);
    out
}

/// System directories a program needs, readable and executable in every plugin sandbox.
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/proc", "/dev", "/sys",
];

/// Directories to open for the program itself when it lives outside the system directories:
/// for `~/.pyenv/shims/python3` the prefix `~/.pyenv` (its `bin`, `shims` or `libexec`
/// directory's parent, where its libraries are), for a program elsewhere its directory. Both
/// the path found and the one its symlinks lead to count.
fn program_dirs(program: &str, path: Option<&OsString>, cwd: Option<&Path>) -> Vec<PathBuf> {
    let found = if program.contains('/') {
        let p = PathBuf::from(program);
        Some(match cwd {
            Some(c) if p.is_relative() => c.join(p),
            _ => p,
        })
    } else {
        path.and_then(|path| {
            std::env::split_paths(path)
                .map(|d| d.join(program))
                .find(|f| f.is_file())
        })
    };
    let Some(found) = found else {
        return Vec::new();
    };
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut dirs = Vec::new();
    for p in [Some(found.clone()), std::fs::canonicalize(&found).ok()]
        .into_iter()
        .flatten()
    {
        let Some(dir) = p.parent() else { continue };
        if dir == Path::new("/") || SYSTEM_DIRS.iter().any(|s| dir.starts_with(s)) {
            continue;
        }
        let binlike = dir
            .file_name()
            .is_some_and(|n| matches!(n.as_bytes(), b"bin" | b"sbin" | b"shims" | b"libexec"));
        let prefix = dir.parent().filter(|pre| {
            binlike && pre.components().count() >= 3 && Some(*pre) != home.as_deref()
        });
        let chosen = prefix.unwrap_or(dir).to_path_buf();
        if !dirs.contains(&chosen) {
            dirs.push(chosen);
        }
    }
    dirs
}

mod landlock {
    //! Raw Landlock system calls (no libc wrappers exist).

    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    const CREATE_RULESET_VERSION: u32 = 1 << 0;
    const RULE_PATH_BENEATH: libc::c_int = 1;

    const EXECUTE: u64 = 1 << 0;
    const WRITE_FILE: u64 = 1 << 1;
    const READ_FILE: u64 = 1 << 2;
    const READ_DIR: u64 = 1 << 3;
    /// REMOVE_DIR through MAKE_SYM (ABI 1).
    const WRITE_DIR: u64 = 0b1_1111_1111_0000;
    const REFER: u64 = 1 << 13;
    const TRUNCATE: u64 = 1 << 14;
    const IOCTL_DEV: u64 = 1 << 15;
    /// Rights that make sense on a file that is not a directory.
    const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;

    /// ABI 6: no signals to processes outside the domain, no abstract UNIX sockets outside it.
    const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    const SCOPE_SIGNAL: u64 = 1 << 1;

    /// `struct landlock_ruleset_attr`; the kernel takes a prefix of it (older ABIs are shorter).
    #[repr(C)]
    struct RulesetAttr {
        handled_access_fs: u64,
        handled_access_net: u64,
        scoped: u64,
    }

    #[repr(C, packed)]
    struct PathBeneathAttr {
        allowed_access: u64,
        parent_fd: i32,
    }

    /// The ABI version this kernel reports, or why there is none.
    pub(super) fn abi() -> Result<u32, String> {
        // SAFETY: with a null attribute, size 0 and the VERSION flag, the call only returns
        // the ABI version; no memory is read or written.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<RulesetAttr>(),
                0usize,
                CREATE_RULESET_VERSION,
            )
        };
        if r >= 1 {
            return Ok(r as u32);
        }
        let e = io::Error::last_os_error();
        Err(match e.raw_os_error() {
            Some(libc::ENOSYS) => "the kernel was built without it (ENOSYS)".into(),
            Some(libc::EOPNOTSUPP) => "disabled at boot (EOPNOTSUPP)".into(),
            _ => format!("probe failed: {e}"),
        })
    }

    /// Every filesystem right ABI `abi` knows.
    fn handled(abi: u32) -> u64 {
        let mut h = EXECUTE | WRITE_FILE | READ_FILE | READ_DIR | WRITE_DIR;
        if abi >= 2 {
            h |= REFER;
        }
        if abi >= 3 {
            h |= TRUNCATE;
        }
        if abi >= 5 {
            h |= IOCTL_DEV;
        }
        h
    }

    /// A ruleset for `policy`, every rule added; `program_dirs` are opened like system
    /// directories.
    pub(super) fn ruleset(
        abi: u32,
        policy: &Policy,
        program_dirs: &[PathBuf],
    ) -> io::Result<OwnedFd> {
        let handled = handled(abi);
        let mut scoped = 0;
        if abi >= 6 {
            scoped = SCOPE_SIGNAL;
            if !policy.network {
                scoped |= SCOPE_ABSTRACT_UNIX_SOCKET;
            }
        }
        let attr = RulesetAttr {
            handled_access_fs: handled,
            handled_access_net: 0,
            scoped,
        };
        // The prefix this ABI knows: `scoped` from 6, `handled_access_net` from 4.
        let size = match abi {
            ..=3 => 8usize,
            4 | 5 => 16,
            _ => 24,
        };
        // SAFETY: `attr` is a live, initialised landlock_ruleset_attr of at least `size` bytes
        // (the kernel reads that prefix).
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size,
                0u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the call returned a new file descriptor (close-on-exec) that nothing else owns.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let read = EXECUTE | READ_FILE | READ_DIR;
        let write = WRITE_FILE | WRITE_DIR | REFER | TRUNCATE;
        let mut rules: Vec<(PathBuf, u64)> = Vec::new();
        if policy.fs_read {
            rules.push(("/".into(), read));
        }
        rules.push((policy.plugin_dir.clone(), read));
        for d in SYSTEM_DIRS {
            rules.push((d.into(), if *d == "/dev" { read | IOCTL_DEV } else { read }));
        }
        for d in program_dirs {
            rules.push((d.clone(), read));
        }
        rules.push(("/dev/null".into(), READ_FILE | WRITE_FILE | TRUNCATE));
        if policy.fs_write {
            rules.push((policy.write_dir.clone(), read | write));
            rules.push(("/tmp".into(), read | write));
        }
        for (path, rights) in rules {
            add_rule(&ruleset, &path, rights & handled)?;
        }
        Ok(ruleset)
    }

    /// Allows `rights` beneath `path` (a missing path is skipped).
    fn add_rule(ruleset: &OwnedFd, path: &Path, rights: u64) -> io::Result<()> {
        let file = match std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot open {} for a Landlock rule: {e}", path.display()),
                ))
            }
        };
        let rights = if file.metadata()?.is_dir() {
            rights
        } else {
            rights & FILE_RIGHTS
        };
        let attr = PathBeneathAttr {
            allowed_access: rights,
            parent_fd: file.as_raw_fd(),
        };
        // SAFETY: `attr` is a live landlock_path_beneath_attr (packed, as the kernel's) and
        // both descriptors are open for the duration of the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset.as_raw_fd(),
                RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0u32,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot add a Landlock rule for {}: {e}", path.display()),
            ));
        }
        Ok(())
    }
}

mod seccomp {
    //! A classic-BPF seccomp filter denying sockets other than `AF_UNIX`.

    use super::*;

    #[cfg(target_arch = "x86_64")]
    const ARCH: Option<u32> = Some(0xC000_003E); // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: Option<u32> = Some(0xC000_00B7); // AUDIT_ARCH_AARCH64
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const ARCH: Option<u32> = None;

    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    #[cfg(target_arch = "x86_64")]
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_ALLOW: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
    /// Offsets in `struct seccomp_data`: nr, arch, the low 32 bits of args[0] (little-endian).
    const NR: u32 = 0;
    const ARCH_OFF: u32 = 4;
    const ARG0: u32 = 16;

    fn stmt(code: u16, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        }
    }

    fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }

    /// Whether a filter can be installed here, or why not.
    pub(super) fn available() -> Result<(), String> {
        if ARCH.is_none() {
            return Err(format!(
                "no filter is built for this architecture ({})",
                std::env::consts::ARCH
            ));
        }
        let action: u32 = libc::SECCOMP_RET_ERRNO;
        // SAFETY: SECCOMP_GET_ACTION_AVAIL reads the u32 behind the pointer, a live local.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_GET_ACTION_AVAIL,
                0,
                &action as *const u32,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(format!(
                "the kernel refuses filters: {}",
                io::Error::last_os_error()
            ))
        }
    }

    /// The filter, or `None` on an architecture it is not written for.
    pub(super) fn program() -> Option<Box<[libc::sock_filter]>> {
        let arch = ARCH?;
        let deny = stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::EACCES as u32);
        let allow = stmt(RET_K, RET_ALLOW);
        let mut p = vec![
            stmt(LD_W_ABS, ARCH_OFF),
            jump(JEQ_K, arch, 1, 0),
            deny, // a system call of another ABI (i386 through int 0x80, say)
            stmt(LD_W_ABS, NR),
        ];
        #[cfg(target_arch = "x86_64")]
        p.extend([jump(JGE_K, 0x4000_0000, 0, 1), deny]); // x32 system calls
        p.extend([
            jump(JEQ_K, libc::SYS_io_uring_setup as u32, 0, 1),
            deny,
            jump(JEQ_K, libc::SYS_socket as u32, 1, 0),
            allow,
            stmt(LD_W_ABS, ARG0),
            jump(JEQ_K, libc::AF_UNIX as u32, 0, 1),
            allow,
            deny,
        ]);
        Some(p.into_boxed_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    #[test]
    fn sizes_parse_in_binary_units_and_show_back() {
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("2 GiB"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1MB"), None);
        assert_eq!(parse_size("lots"), None);
        assert_eq!(show_size(256 << 20), "256 MiB");
        assert_eq!(show_size(1536 << 10), "1536 KiB");
        assert_eq!(show_size(1_000_001), "1000001 bytes");
    }

    #[test]
    fn limits_tables_are_checked_key_by_key() {
        let l = Limits::from_table(&table("address_space = \"256MiB\"\ncpu_seconds = 2")).unwrap();
        assert_eq!(l.address_space, Some(256 << 20));
        assert_eq!(l.to_string(), "address_space = 256 MiB, cpu_seconds = 2");
        let e = Limits::from_table(&table("cpu_seconds = \"1s\"")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`limits.cpu_seconds`: expected an integer of at least 1, found the string \"1s\""
        );
        let e = Limits::from_table(&table("address_space = \"lots\"")).unwrap_err();
        assert!(e.message.contains("such as \"512MiB\""), "{e}");
        let e = Limits::from_table(&table("memory = 1")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`limits.memory`: unknown limit (known: address_space, cpu_seconds, open_files)"
        );
        let stage = Limits {
            cpu_seconds: Some(1),
            ..Limits::default()
        };
        let manifest = Limits {
            cpu_seconds: Some(9),
            open_files: Some(64),
            ..Limits::default()
        };
        assert_eq!(
            stage.or(&manifest).to_string(),
            "cpu_seconds = 1, open_files = 64"
        );
    }

    fn policy(network: bool) -> Policy {
        Policy {
            plugin_dir: "/nonexistent/plugin".into(),
            write_dir: "/nonexistent".into(),
            fs_read: false,
            fs_write: false,
            network,
        }
    }

    /// A kernel without Landlock or seccomp: the stage still runs, and what is missing is
    /// reported.
    #[test]
    fn missing_kernel_features_are_reported_not_fatal() {
        let none = Support {
            landlock: Err("the kernel was built without it (ENOSYS)".into()),
            seccomp: Err("the kernel refuses filters".into()),
        };
        let s = ChildSetup::prepare(
            &Limits::default(),
            Some(&policy(false)),
            "sh",
            None,
            None,
            &none,
        )
        .unwrap();
        assert!(s.landlock.is_none() && s.seccomp.is_none());
        assert_eq!(s.missing.len(), 2, "{:?}", s.missing);
        assert!(s.missing[0].contains(
            "Landlock is not available on this kernel (the kernel was built without it (ENOSYS))"
        ));
        assert!(s.missing[1].contains("seccomp is not available"));
        // With `network` granted, no filter is wanted, so none is missing.
        let s = ChildSetup::prepare(
            &Limits::default(),
            Some(&policy(true)),
            "sh",
            None,
            None,
            &none,
        )
        .unwrap();
        assert_eq!(s.missing.len(), 1);
        // Not a plugin stage: limits only.
        let s = ChildSetup::prepare(&Limits::default(), None, "sh", None, None, &none).unwrap();
        assert!(s.is_empty() && s.missing.is_empty());
    }

    #[test]
    fn inspect_lines_say_what_applies_and_what_this_kernel_lacks() {
        let limits = Limits {
            cpu_seconds: Some(5),
            ..Limits::default()
        };
        let full = Support {
            landlock: Ok(4),
            seccomp: Ok(()),
        };
        let lines = describe_process(&limits, &["filesystem.read".into()], &full);
        assert!(lines[0].starts_with("limits: cpu_seconds = 5"), "{lines:?}");
        assert!(lines[2].starts_with("landlock (ABI 4 on this kernel): reads everywhere"));
        assert!(lines[2].contains("writes nowhere but /dev/null"));
        assert!(lines[3].contains("fail with EACCES"), "{lines:?}");
        let none = Support {
            landlock: Err("disabled at boot (EOPNOTSUPP)".into()),
            seccomp: Err("no filter is built for this architecture (riscv64)".into()),
        };
        let lines = describe_process(&limits, &[], &none);
        assert_eq!(lines[2], "landlock: not supported on this kernel (disabled at boot (EOPNOTSUPP)): the filesystem is not restricted");
        assert!(lines[3].starts_with(
            "seccomp: not supported here (no filter is built for this architecture (riscv64))"
        ));
        let lines = describe_process(&limits, &["network".into()], &none);
        assert!(lines[3].contains("sockets allowed"), "{lines:?}");
    }

    /// This kernel, as probed: what it supports is prepared, and nothing is reported missing.
    #[test]
    fn this_kernel_is_probed_and_its_features_prepared() {
        let sup = support();
        eprintln!("{sup}");
        let s = ChildSetup::prepare(
            &Limits::default(),
            Some(&policy(false)),
            "sh",
            None,
            None,
            sup,
        )
        .unwrap();
        assert_eq!(s.landlock.is_some(), sup.landlock.is_ok());
        assert_eq!(s.seccomp.is_some(), sup.seccomp.is_ok());
        assert_eq!(
            s.missing.len(),
            sup.landlock.is_err() as usize + sup.seccomp.is_err() as usize
        );
    }

    #[test]
    fn a_pyenv_style_program_opens_its_prefix_and_system_programs_nothing() {
        let path = OsString::from("/usr/bin:/bin");
        assert!(program_dirs("sh", Some(&path), None).is_empty());
        let home = tempfile::tempdir().unwrap();
        let shims = home.path().join("tool/shims");
        std::fs::create_dir_all(&shims).unwrap();
        std::fs::write(shims.join("py"), "#!/bin/sh\n").unwrap();
        let path = OsString::from(format!("/usr/bin:{}", shims.display()));
        assert_eq!(
            program_dirs("py", Some(&path), None),
            vec![home.path().join("tool")]
        );
    }
}
