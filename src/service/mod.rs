//! A service: a chain of jobs that serve under one name, one API key and one URL. Its
//! directory (default `~/.ray-launch/services/NAME/`, 0700, on the shared home) holds the
//! service key (`key`, 0600, made once and used by every job of the chain) and the service
//! file (`service.json`, 0600): each job of the chain, its state and URL, its successor, and
//! whether the service was stopped. Every change is a read-modify-write under an exclusive
//! `flock` of `lock`, written atomically (temp file + rename), so the jobs of a chain and
//! `ray-launch service stop` never lose each other's word. [`handover`] decides when a job
//! hands over, purely.

pub mod handover;

use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// What a job of the chain is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Submitted by its predecessor, not started yet.
    #[default]
    Queued,
    Starting,
    /// Every model ready: routers following the service send it requests.
    Serving,
    /// Handing over (or stopped): no new requests; those in flight finish.
    Draining,
    Ended,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Starting => "starting",
            JobState::Serving => "serving",
            JobState::Draining => "draining",
            JobState::Ended => "ended",
            JobState::Failed => "failed",
        }
    }

    pub fn is_over(self) -> bool {
        matches!(self, JobState::Ended | JobState::Failed)
    }
}

/// One job of the chain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub job: String,
    pub state: JobState,
    /// The job's URL (its router's, `…/v1`), once it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_file: Option<String>,
    /// When Slurm ends it (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<u64>,
    /// When it submits its successor (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successor: Option<String>,
    /// The last word on it: why it ended, or why its successor failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds since the epoch of the last change.
    #[serde(default)]
    pub updated: u64,
}

/// `service.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceFile {
    pub name: String,
    /// `ray-launch service stop`: no successor, every job drains and ends.
    #[serde(default)]
    pub stopped: bool,
    #[serde(default)]
    pub jobs: Vec<Job>,
}

impl ServiceFile {
    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.job == id)
    }

    /// The entry of job `id`, made when missing.
    pub fn job_mut(&mut self, id: &str) -> &mut Job {
        if let Some(i) = self.jobs.iter().position(|j| j.job == id) {
            return &mut self.jobs[i];
        }
        self.jobs.push(Job {
            job: id.to_string(),
            ..Default::default()
        });
        self.jobs.last_mut().expect("just pushed")
    }

    /// The jobs that serve now (routers following the service send them requests).
    pub fn serving(&self) -> impl Iterator<Item = &Job> {
        self.jobs.iter().filter(|j| j.state == JobState::Serving)
    }
}

/// Where service NAME lives: `dir` when given (the config's `service.dir`), else
/// `$HOME/.ray-launch/services/NAME`.
pub fn dir_of(name: &str, dir: Option<&str>) -> Result<PathBuf, String> {
    if let Some(d) = dir {
        return Ok(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or("HOME is not set: give the service's directory (service.dir)")?;
    Ok(Path::new(&home).join(".ray-launch/services").join(name))
}

/// A service name: what a directory and a job name may hold.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a service name: 1 to 64 letters, digits, `-`, `_` or `.`, not starting with `.`"
        ))
    }
}

/// The service's directory, taken (0700, this user's; a path someone else made is refused).
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub dir: PathBuf,
}

impl Service {
    pub fn open(name: &str, dir: Option<&str>) -> Result<Service, String> {
        check_name(name)?;
        let dir = dir_of(name, dir)?;
        crate::private::private_dir(&dir).map_err(|e| format!("the service directory {e}"))?;
        Ok(Service {
            name: name.to_string(),
            dir,
        })
    }

    /// A service that exists (for `route --service`, `status --service`, `service stop`):
    /// nothing is created, and a directory someone else could reach is refused.
    pub fn find(name: &str, dir: Option<&str>) -> Result<Service, String> {
        use std::os::unix::fs::MetadataExt as _;
        check_name(name)?;
        let dir = dir_of(name, dir)?;
        let md = std::fs::symlink_metadata(&dir).map_err(|e| {
            format!(
                "no service directory at {} ({e}): its first job makes it",
                dir.display()
            )
        })?;
        let me = nix::unistd::getuid().as_raw();
        if !md.is_dir() || md.uid() != me || md.mode() & 0o077 != 0 {
            return Err(format!(
                "{} is not a directory of yours that only you can reach (mode {:o}, uid {})",
                dir.display(),
                md.mode() & 0o7777,
                md.uid()
            ));
        }
        Ok(Service {
            name: name.to_string(),
            dir,
        })
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key")
    }

    pub fn file_path(&self) -> PathBuf {
        self.dir.join("service.json")
    }

    /// The service key: made once (0600, never through a link), then read by every job.
    pub fn ensure_key(&self) -> Result<PathBuf, String> {
        let path = self.key_path();
        let made = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path);
        match made {
            Ok(mut f) => {
                f.write_all(format!("rl-{}\n", crate::auth::random_hex()).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        }
        let mode = crate::private::mode(&path).unwrap_or(0);
        if mode & 0o077 != 0 {
            return Err(format!(
                "{} has mode {mode:o}: other users could read the service key; chmod 600 it",
                path.display()
            ));
        }
        Ok(path)
    }

    /// The service file as it is now (empty when none was written yet).
    pub fn read(&self) -> Result<ServiceFile, String> {
        read_file(&self.file_path(), &self.name)
    }

    /// Change the service file under its lock; what `f` returns.
    pub fn update<T>(&self, f: impl FnOnce(&mut ServiceFile) -> T) -> Result<T, String> {
        let lock_path = self.dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("cannot lock {}: {e}", lock_path.display()))?;
        let mut sf = self.read()?;
        let out = f(&mut sf);
        let text = serde_json::to_vec_pretty(&sf).expect("the service file serializes");
        crate::private::write_atomic(&self.file_path(), &text)
            .map_err(|e| format!("cannot write {}: {e}", self.file_path().display()))?;
        Ok(out)
    }
}

/// The largest service file read (a chain's file holds a few entries per job).
const MAX_FILE: u64 = 4 << 20;

/// Read a service file; a missing one is an empty service named `name`.
pub fn read_file(path: &Path, name: &str) -> Result<ServiceFile, String> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(ServiceFile {
                name: name.to_string(),
                ..Default::default()
            })
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut text = String::new();
    f.take(MAX_FILE)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a service file: {e}", path.display()))
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_directory_key_and_file_are_private_and_shared_by_the_chain() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("svc");
        let s = Service::open("llama", Some(d.to_str().unwrap())).unwrap();
        assert_eq!(crate::private::mode(&d), Some(0o700));
        let k = s.ensure_key().unwrap();
        assert_eq!(crate::private::mode(&k), Some(0o600));
        let key = std::fs::read_to_string(&k).unwrap();
        // the next job of the chain gets the same key
        assert_eq!(s.ensure_key().unwrap(), k);
        assert_eq!(std::fs::read_to_string(&k).unwrap(), key);
        s.update(|f| {
            f.job_mut("10").state = JobState::Serving;
            f.job_mut("11").state = JobState::Starting;
        })
        .unwrap();
        s.update(|f| f.job_mut("10").successor = Some("11".into()))
            .unwrap();
        let f = s.read().unwrap();
        assert_eq!(f.jobs.len(), 2);
        assert_eq!(f.job("10").unwrap().successor.as_deref(), Some("11"));
        assert_eq!(f.serving().count(), 1);
        assert_eq!(crate::private::mode(&s.file_path()), Some(0o600));
    }

    #[test]
    fn a_directory_someone_else_can_reach_and_a_readable_key_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("svc");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Service::open("x", Some(d.to_str().unwrap())).unwrap_err();
        assert!(e.contains("mode 777"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let s = Service::open("x", Some(d.to_str().unwrap())).unwrap();
        std::fs::write(s.key_path(), "planted\n").unwrap();
        std::fs::set_permissions(s.key_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = s.ensure_key().unwrap_err();
        assert!(e.contains("other users could read the service key"), "{e}");
    }

    #[test]
    fn names_are_checked() {
        for ok in ["llama-70b", "a", "svc_1.2"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
