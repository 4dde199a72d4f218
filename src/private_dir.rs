//! Private directories for the engine's copies of plugin code (a native library loaded from a
//! copy, a process plugin's directory copied for one version), and copies into them that
//! follow no symbolic link on the way in.
//!
//! The temporary directory (`$TMPDIR`, else `/tmp`) is shared by every local user. A copy at a
//! predictable path there (`/tmp/millrace-native/<name>-<pid>-<n>.so`, as it once was) lets
//! another user create the directory first and plant a symbolic link where the copy will be
//! written (the engine then writes through it, to a file of the other user's choosing), or
//! replace the copy between writing it and `dlopen` or `exec` (the engine then runs their
//! code). So:
//!
//! - each copy gets a [`PrivateDir`] of its own: one `mkdir(2)` of a name carrying 128
//!   unpredictable bits, mode 0700. `mkdir` fails on anything already at that path (a planted
//!   directory or link is never used: another name is drawn). The new directory is then opened
//!   without following links and checked (a directory, owned by this user) and its mode set to
//!   0700 through that descriptor, whatever the umask. Only its owner can add, replace or rename
//!   anything in it, so what was copied there is what gets loaded or run;
//! - every file is created with `O_CREAT | O_EXCL | O_NOFOLLOW` (never through an existing
//!   file or link), every subdirectory with `mkdir`, with the owner's permission bits only;
//! - it is removed, with everything in it, when dropped (`std::fs::remove_dir_all`, which does
//!   not follow links). A process killed outright leaves it behind, as any temporary file.
//!
//! The parent must be one where others cannot rename or remove this user's entries: a
//! sticky-bit directory such as `/tmp`, or a private one.
//!
//! What a symbolic link *inside a plugin's directory* means for [`copy_dir`] is written there.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How many fresh names [`PrivateDir::new_in`] tries before giving up (each taken name is
/// either a collision of 128 random bits or something planted).
const ATTEMPTS: usize = 16;

/// A directory of this process's own, mode 0700 under the temporary directory, removed with
/// everything in it when dropped (see the module docs).
#[derive(Debug)]
pub(crate) struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// A fresh private directory `<prefix><random>` in the temporary directory.
    pub(crate) fn new(prefix: &str) -> io::Result<PrivateDir> {
        Self::new_in(&std::env::temp_dir(), prefix)
    }

    /// A fresh private directory `<prefix><random>` in `parent`.
    pub(crate) fn new_in(parent: &Path, prefix: &str) -> io::Result<PrivateDir> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let path = parent.join(format!("{prefix}{}", random_hex()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let dir = PrivateDir { path };
                    dir.secure()?; // on error, dropping `dir` removes what was made
                    return Ok(dir);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(with_path(e, "cannot create", &path)),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "cannot create a private directory in {}: {ATTEMPTS} fresh names were all taken \
                 (last: {})",
                parent.display(),
                last.map_or_else(String::new, |e| e.to_string())
            ),
        ))
    }

    /// Checks that what was made is this user's directory (not something swapped in), and sets
    /// its mode to 0700 through a descriptor (the umask may have taken owner bits away).
    fn secure(&self) -> io::Result<()> {
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&self.path)
            .map_err(|e| with_path(e, "cannot open the new directory", &self.path))?;
        let meta = dir.metadata()?;
        // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot fail.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != me {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} was replaced right after it was created: refusing to use it",
                    self.path.display()
                ),
            ));
        }
        dir.set_permissions(std::fs::Permissions::from_mode(0o700))
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // `remove_dir_all` removes links, never what they point to.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// 128 bits no other user can predict, as hex: SipHash under std's per-process random keys
/// (`RandomState`, seeded by the OS's random source), of the time, the process id and a
/// per-process counter (so two calls in one process never collide). Also names the checkpoint
/// store's temporary files.
pub(crate) fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: crate::sync::statics::AtomicU64 = crate::sync::statics::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, crate::sync::Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut out = String::with_capacity(32);
    for half in 0u8..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(now);
        h.write_u32(std::process::id());
        h.write_u64(n);
        h.write_u8(half);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Copies the regular file at `src` to `dst`, a new file (created with `O_EXCL | O_NOFOLLOW`:
/// never through an existing file or link), with the owner's permission bits of `src`. With
/// `follow` false, `src` itself must not be a symbolic link (`O_NOFOLLOW`); with `follow` true,
/// the links on the way to it are followed, as `dlopen` or `exec` of that path would. Either
/// way what is read must be a regular file (checked on the open descriptor). Returns the bytes
/// copied.
pub(crate) fn copy_file(src: &Path, dst: &Path, follow: bool) -> io::Result<u64> {
    let flags = if follow { 0 } else { libc::O_NOFOLLOW };
    let mut from = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(src)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is a symbolic link: not followed", src.display()),
            ),
            _ => with_path(e, "cannot read", src),
        })?;
    let meta = from.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", src.display()),
        ));
    }
    let mut to: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode((meta.mode() & 0o700) | 0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dst)
        .map_err(|e| with_path(e, "cannot create", dst))?;
    io::copy(&mut from, &mut to).map_err(|e| with_path(e, "cannot write", dst))
}

/// Bounds on a directory copied by [`copy_dir`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyLimits {
    /// Most entries (files, directories and links).
    pub files: usize,
    /// Most bytes in all.
    pub bytes: u64,
}

/// Copies the directory `from` (a plugin's directory) to `to`, which must not exist yet (it
/// is made, mode 0700, inside a [`PrivateDir`]), within `limits`.
///
/// `from` itself is the directory the user configured and may be reached through links. Inside
/// it nothing is followed blindly: directories and regular files are copied; a **symbolic
/// link** is copied as the regular file it points to when that file lies inside `from` (a
/// library's `libx.so -> libx.so.1`, a `current -> v2.py`); any other link (to something
/// outside the plugin's directory, to a directory, or dangling) is refused with an error
/// naming it. A link out of the directory would otherwise put into the copy, which a sandboxed
/// plugin may read, a file its sandbox does not let it read; and a link to a directory could
/// loop. Anything else (a FIFO, a socket, a device) is refused too.
pub(crate) fn copy_dir(from: &Path, to: &Path, limits: CopyLimits) -> io::Result<()> {
    let root = std::fs::canonicalize(from).map_err(|e| with_path(e, "cannot read", from))?;
    let mut seen = (0, 0);
    copy_tree(&root, &root, to, limits, &mut seen)
}

fn copy_tree(
    root: &Path,
    from: &Path,
    to: &Path,
    limits: CopyLimits,
    seen: &mut (usize, u64),
) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(to)
        .map_err(|e| with_path(e, "cannot create", to))?;
    for e in std::fs::read_dir(from).map_err(|e| with_path(e, "cannot read", from))? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        // The entry's own type: a link is not followed here.
        let meta = std::fs::symlink_metadata(&src)?;
        seen.0 += 1;
        seen.1 += meta.len();
        let too_big = || {
            io::Error::other(format!(
                "the plugin directory is larger than {} files or {} MiB",
                limits.files,
                limits.bytes >> 20
            ))
        };
        if seen.0 > limits.files || seen.1 > limits.bytes {
            return Err(too_big());
        }
        let kind = meta.file_type();
        if kind.is_dir() {
            copy_tree(root, &src, &dst, limits, seen)?;
        } else if kind.is_file() {
            copy_file(&src, &dst, false)?;
        } else if kind.is_symlink() {
            let target = link_target_inside(root, &src)?;
            // Counted at its real size, not the link's.
            seen.1 += std::fs::metadata(&target)?.len();
            if seen.1 > limits.bytes {
                return Err(too_big());
            }
            copy_file(&target, &dst, false)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a file, a directory nor a symbolic link: not copied",
                    src.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Where the link `link` in the plugin directory `root` (canonical) leads, if that is a
/// regular file inside `root`; otherwise the error that names it. The path returned is
/// canonical: no link left in it.
fn link_target_inside(root: &Path, link: &Path) -> io::Result<PathBuf> {
    let shown = std::fs::read_link(link).unwrap_or_default();
    let refuse = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link to {}, {why}: only links to files inside the plugin's \
                 directory are copied (copy the file into the directory instead)",
                link.display(),
                shown.display()
            ),
        )
    };
    let target = match std::fs::canonicalize(link) {
        Ok(t) => t,
        Err(e) => return Err(refuse(format!("which cannot be followed ({e})"))),
    };
    if !target.starts_with(root) {
        return Err(refuse("which is outside the plugin's directory".into()));
    }
    if !std::fs::metadata(&target)?.is_file() {
        return Err(refuse("which is not a regular file".into()));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_private_dir_is_fresh_0700_and_removed_when_dropped() {
        let parent = tempfile::tempdir().unwrap();
        let a = PrivateDir::new_in(parent.path(), "p-").unwrap();
        let b = PrivateDir::new_in(parent.path(), "p-").unwrap();
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("p-") && name.len() == 2 + 32, "{name}");
        assert!(a.path().is_dir());
        assert_eq!(mode(a.path()), 0o700);
        std::fs::write(a.path().join("f"), "x").unwrap();
        std::fs::create_dir(a.path().join("d")).unwrap();
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists(), "removed with its contents");
        assert!(b.path().is_dir());
    }

    #[test]
    fn copies_create_new_files_and_never_write_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let (src, victim) = (dir.path().join("src"), dir.path().join("victim"));
        std::fs::write(&src, "code").unwrap();
        std::fs::write(&victim, "precious").unwrap();
        let planted = dir.path().join("planted");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let e = copy_file(&src, &planted, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // A link as the source: refused unless following was asked for.
        let e = copy_file(&planted, &dir.path().join("a"), false).unwrap_err();
        assert!(
            e.to_string().contains("is a symbolic link: not followed"),
            "{e}"
        );
        copy_file(&planted, &dir.path().join("b"), true).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("b")).unwrap(),
            "precious"
        );
        assert_eq!(
            mode(&dir.path().join("b")) & 0o077,
            0,
            "the owner's bits only"
        );
    }

    #[test]
    fn a_plugin_dir_copy_follows_links_only_to_files_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("plugin");
        std::fs::create_dir_all(plugin.join("lib")).unwrap();
        std::fs::write(plugin.join("lib/libx.so.1"), "lib").unwrap();
        std::os::unix::fs::symlink("libx.so.1", plugin.join("lib/libx.so")).unwrap();
        let limits = CopyLimits {
            files: 100,
            bytes: 1 << 20,
        };
        let private = PrivateDir::new_in(dir.path(), "c-").unwrap();
        let to = private.path().join("copy");
        copy_dir(&plugin, &to, limits).unwrap();
        let copied = to.join("lib/libx.so");
        assert!(std::fs::symlink_metadata(&copied).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&copied).unwrap(), "lib");
        assert_eq!(mode(&to), 0o700);

        // Out of the directory, to a directory, dangling: refused, naming the link.
        std::fs::write(dir.path().join("secret"), "s").unwrap();
        for (name, target) in [
            ("out", dir.path().join("secret")),
            ("sub", plugin.join("lib")),
            ("gone", plugin.join("nothing")),
        ] {
            let link = plugin.join(name);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let to = private.path().join(format!("copy-{name}"));
            let e = copy_dir(&plugin, &to, limits).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(&format!("{} is a symbolic link to", link.display())),
                "{text}"
            );
            assert!(!to.join(name).exists(), "{name}");
            std::fs::remove_file(&link).unwrap();
        }
    }
}
