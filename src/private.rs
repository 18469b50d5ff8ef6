//! Files and directories only the job's user can read: directories created 0700 (or refused
//! when someone else made the path first), files 0600 written through a fresh temp file and a
//! rename (never following a symlink someone planted), logs opened without following links,
//! and removal of only what the job itself created.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// What a private directory was when the job took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirState {
    /// The launcher made it: remove it whole at the end.
    Created,
    /// The user's own 0700 directory: at the end remove only entries that were not there.
    Existing(BTreeSet<OsString>),
}

fn me() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// Make `path` a directory only this user can enter. A path that exists must be a real
/// directory (not a link) of this user with no access for others; anything else is refused
/// with the reason (someone may have created it to watch or feed the job).
pub fn private_dir(path: &Path) -> Result<DirState, String> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => return Ok(DirState::Created),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
    }
    let md = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let why = if md.file_type().is_symlink() {
        Some("is a symbolic link".to_string())
    } else if !md.is_dir() {
        Some("exists and is not a directory".to_string())
    } else if md.uid() != me() {
        Some(format!(
            "exists and belongs to uid {}, not to you (uid {})",
            md.uid(),
            me()
        ))
    } else if md.mode() & 0o077 != 0 {
        Some(format!(
            "exists with mode {:o}: other users can reach what the job puts there",
            md.mode() & 0o7777
        ))
    } else {
        None
    };
    if let Some(why) = why {
        return Err(format!("{} {why}", path.display()));
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| format!("cannot list {}: {e}", path.display()))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    Ok(DirState::Existing(entries))
}

/// A directory of this user for files that are private themselves (a log dir): created
/// 0700; an existing one is taken if it is this user's and not a link.
pub fn own_dir(path: &Path) -> Result<(), String> {
    match private_dir(path) {
        Ok(_) => Ok(()),
        Err(e) => {
            let md = std::fs::symlink_metadata(path).map_err(|_| e.clone())?;
            if md.is_dir() && !md.file_type().is_symlink() && md.uid() == me() {
                Ok(())
            } else {
                Err(e)
            }
        }
    }
}

/// The file in a temp dir the launcher created whose `flock` says a live launcher owns it.
pub const LOCK_FILE: &str = ".ray-launch.lock";

/// An exclusive `flock` on a created dir's [`LOCK_FILE`], held for the launcher's lifetime (the
/// kernel drops it when the launcher dies, however it dies).
pub struct DirLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

/// What ray-launch writes in a lock file it makes: this, then a random id.
const LOCK_MARKER: &str = "ray-launch temp dir ";

/// Take the lock of a dir the launcher just created. The lock file is made under another name
/// (holding ray-launch's marker and a random id) and renamed into place once locked, so nobody
/// ever sees it unlocked while we live.
pub fn lock_dir(dir: &Path) -> std::io::Result<DirLock> {
    use std::io::Write as _;
    let tmp = dir.join(format!(".ray-launch.lock.{}", std::process::id()));
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(format!("{LOCK_MARKER}{}\n", crate::auth::random_hex()).as_bytes())?;
    let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| std::io::Error::from(e))?;
    std::fs::rename(&tmp, dir.join(LOCK_FILE))?;
    Ok(DirLock(lock))
}

/// A name with its digit runs made `#` (`rl-123.0-2` → `rl-#.#-#`): temp dirs of other jobs
/// and steps made from the same template look alike.
fn skeleton(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `p` is a temp dir a ray-launch of this user left: `Ok(lock)` (held: its launcher is
/// gone) or why it is left alone. `Err(None)`: not a ray-launch dir at all (no lock file).
fn stale_own(p: &Path, like: &str) -> Result<nix::fcntl::Flock<std::fs::File>, Option<String>> {
    use std::io::Read as _;
    let md = std::fs::symlink_metadata(p).map_err(|_| None)?;
    if !md.is_dir() || md.uid() != me() {
        return Err(None);
    }
    let lock = p.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK)
        .open(&lock)
        .map_err(|_| None)?;
    let lmd = f.metadata().map_err(|_| None)?;
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let why = if md.mode() & 0o077 != 0 {
        Some(format!("its mode is {:o}, not 0700", md.mode() & 0o7777))
    } else if !lmd.is_file() || lmd.uid() != me() {
        Some(format!(
            "its lock file is not a file of yours (uid {})",
            lmd.uid()
        ))
    } else if skeleton(&name) != skeleton(like) {
        Some(format!("its name is not like this job's temp dir `{like}`"))
    } else {
        None
    };
    if let Some(why) = why {
        return Err(Some(why));
    }
    let mut head = String::new();
    let _ = (&f).take(128).read_to_string(&mut head);
    let id = head.strip_prefix(LOCK_MARKER).map(str::trim).unwrap_or("");
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Some("its lock file was not written by ray-launch".into()));
    }
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| None)
    // held: its launcher lives
}

/// Remove this user's temp dirs next to `dir` that a launcher created and that no live launcher
/// holds (left when a launcher was SIGKILLed before its cleanup, as srun does to every task
/// when a batch job is cancelled). Only a dir that is this user's and 0700, named like `dir`,
/// whose lock file is this user's, holds ray-launch's marker and is not held, is removed.
/// Returns what was removed, and the look-alikes left alone with why.
pub fn remove_stale_siblings(dir: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
    let (mut gone, mut left) = (Vec::new(), Vec::new());
    let (Some(parent), Some(like)) = (dir.parent(), dir.file_name()) else {
        return (gone, left);
    };
    let like = like.to_string_lossy().into_owned();
    let Ok(rd) = std::fs::read_dir(parent) else {
        return (gone, left);
    };
    for e in rd.flatten() {
        let p = e.path();
        if p == dir {
            continue;
        }
        match stale_own(&p, &like) {
            Ok(held) => {
                if std::fs::remove_dir_all(&p).is_ok() {
                    gone.push(p);
                }
                drop(held);
            }
            Err(Some(why)) => left.push((p, why)),
            Err(None) => {}
        }
    }
    (gone, left)
}

/// Remove what the job put in `path`: all of it when the launcher created it, else only the
/// entries that were not there before (and are this user's).
pub fn remove_created(path: &Path, state: &DirState) -> std::io::Result<()> {
    match state {
        DirState::Created => match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        },
        DirState::Existing(before) => {
            let Ok(rd) = std::fs::read_dir(path) else {
                return Ok(());
            };
            for e in rd.flatten() {
                if before.contains(&e.file_name()) {
                    continue;
                }
                let p = e.path();
                let Ok(md) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                if md.uid() != me() {
                    continue;
                }
                if md.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                }
            }
            Ok(())
        }
    }
}

/// Write `data` to `path` atomically and privately (0600): a fresh temp file with an
/// unpredictable name in the same directory, then a rename over `path` (which replaces a
/// link there instead of following it).
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".rl-").tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_data().ok();
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Open a log for appending: created 0600, never through a symbolic link.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

/// Mode bits of a path (for messages and tests).
pub fn mode(path: &Path) -> Option<u32> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| m.mode() & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_fresh_dir_is_private_and_removed_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        assert_eq!(private_dir(&p).unwrap(), DirState::Created);
        assert_eq!(mode(&p), Some(0o700));
        std::fs::write(p.join("x"), "1").unwrap();
        remove_created(&p, &DirState::Created).unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn an_existing_dir_keeps_what_was_there() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("mine");
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(p.join("keep.txt"), "user data").unwrap();
        let st = private_dir(&p).unwrap();
        std::fs::create_dir(p.join("session_1")).unwrap();
        std::fs::write(p.join("session_1/f"), "").unwrap();
        remove_created(&p, &st).unwrap();
        assert!(p.join("keep.txt").exists());
        assert!(!p.join("session_1").exists());
    }

    #[test]
    fn open_dirs_links_and_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(private_dir(&open).unwrap_err().contains("mode 755"));
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        assert!(private_dir(&link).unwrap_err().contains("symbolic link"));
        let file = d.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(private_dir(&file).unwrap_err().contains("not a directory"));
        // a log dir of ours with loose modes is taken (its files are 0600), a link is not
        assert!(own_dir(&open).is_ok());
        assert!(own_dir(&link).is_err());
    }

    #[test]
    fn stale_dirs_are_removed_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let live = d.path().join("rl-1.0-0");
        let stale = d.path().join("rl-2.0-0");
        let users = d.path().join("rl-3.0-0");
        for p in [&live, &stale, &users] {
            private_dir(p).unwrap();
        }
        let _held = lock_dir(&live).unwrap();
        drop(lock_dir(&stale).unwrap()); // its launcher died
        std::fs::write(users.join("keep"), "").unwrap(); // no lock file: not ours to judge
        let (removed, left) = remove_stale_siblings(&d.path().join("rl-4.0-0"));
        assert_eq!(removed, std::slice::from_ref(&stale));
        assert!(left.is_empty(), "{left:?}");
        assert!(live.join(LOCK_FILE).exists() && users.join("keep").exists() && !stale.exists());
    }

    /// Only a dir that is this user's, 0700, named like the job's temp dirs, whose lock file
    /// is this user's and holds ray-launch's marker, is removed; look-alikes are named.
    #[test]
    fn a_planted_lock_file_deletes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let made = |name: &str, mode: u32, lock: Option<&str>| {
            let p = d.path().join(name);
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("precious"), "a colleague's file").unwrap();
            if let Some(l) = lock {
                std::fs::write(p.join(LOCK_FILE), l).unwrap();
            }
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let marker = format!("{LOCK_MARKER}{}\n", crate::auth::random_hex());
        let stale = made("rl-5.0-0", 0o700, Some(&marker));
        let open = made("rl-6.0-0", 0o777, Some(&marker));
        let empty = made("rl-7.0-0", 0o700, Some(""));
        let forged = made("rl-8.0-0", 0o700, Some("ray-launch temp dir xyz\n"));
        let other_name = made("notes", 0o700, Some(&marker));
        let plain = made("rl-9.0-0", 0o700, None);
        let (removed, left) = remove_stale_siblings(&d.path().join("rl-4.0-0"));
        assert_eq!(removed, std::slice::from_ref(&stale));
        for p in [&open, &empty, &forged, &other_name, &plain] {
            assert!(p.join("precious").exists(), "{} was removed", p.display());
        }
        let named: Vec<&PathBuf> = left.iter().map(|(p, _)| p).collect();
        for p in [&open, &empty, &forged, &other_name] {
            assert!(named.contains(&p), "{} not named in {left:?}", p.display());
        }
        assert!(!named.contains(&&plain));
        // as root: a lock file planted by another uid in a 0700 dir of ours is not ours either
        if nix::unistd::getuid().is_root() {
            let planted = made("rl-10.0-0", 0o700, Some(&marker));
            nix::unistd::chown(
                &planted.join(LOCK_FILE),
                Some(nix::unistd::Uid::from_raw(65534)),
                None,
            )
            .unwrap();
            let (removed, left) = remove_stale_siblings(&d.path().join("rl-4.0-0"));
            assert!(removed.is_empty(), "{removed:?}");
            assert!(planted.join("precious").exists());
            assert!(
                left.iter()
                    .any(|(p, why)| *p == planted && why.contains("uid 65534")),
                "{left:?}"
            );
        }
    }

    #[test]
    fn atomic_writes_are_private_and_replace_a_planted_link() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("victim");
        std::fs::write(&target, "precious").unwrap();
        let p = d.path().join("endpoint.json");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        write_atomic(&p, b"{}").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{}");
        assert_eq!(mode(&p), Some(0o600));
        // logs: 0600, and a planted link is refused
        let log = d.path().join("x.log");
        open_append(&log).unwrap();
        assert_eq!(mode(&log), Some(0o600));
        let l2 = d.path().join("y.log");
        std::os::unix::fs::symlink(&target, &l2).unwrap();
        assert!(open_append(&l2).is_err());
    }
}
