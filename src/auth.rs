//! Who may join a job's channel: mutual authentication of every rank and the master, bound to
//! the job id, the step id and fresh nonces, and the per-job key it yields (from which the Ray
//! token and the engine's API key are derived).
//!
//! Methods ([`Method`]):
//! - **munge** (default on a Slurm cluster): each side proves it runs as the same UID with a
//!   MUNGE credential (`munge -u UID`, readable only by that UID) whose payload is the
//!   handshake transcript. The master's credential also carries the random per-job key, so it
//!   reaches the ranks encrypted by munged and decodable only by the job's user. Nothing to set up.
//! - **secret**: an HMAC-SHA256 with a per-user secret (`RAY_LAUNCH_SECRET`, or the 0600 file
//!   `RAY_LAUNCH_SECRET_FILE`, default `~/.config/ray-launch/secret`); the per-job key is
//!   derived with HKDF from it and the master's public job nonce. The secret never travels.
//! - **local**: a one-node run without Slurm: the master and its only rank are one process,
//!   which holds a random secret no one else has.
//! - **off**: `security.auth: off`, an explicit opt-out: no proof, no key, no Ray token, no API key.
//!
//! A transcript is a SHA-256 over length-prefixed fields: a label (`rank` or `master`), the
//! job and step ids, the rank's place and name, both nonces, the digest of the rank's Hello,
//! and for the master's answer the outcome. A proof for another job, step, rank, connection
//! or answer does not verify.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// 32 random bytes, hex-encoded (nonces).
pub fn random_hex() -> String {
    hex(&random_bytes())
}

pub fn random_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the OS random source works");
    b
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// How ranks and master prove who they are (`security.auth`, resolved).
#[derive(Clone, PartialEq, Eq)]
pub enum Method {
    Munge,
    Secret(Vec<u8>),
    Local(Vec<u8>),
    Off,
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Munge => "munge",
            Method::Secret(_) => "secret",
            Method::Local(_) => "local",
            Method::Off => "off",
        }
    }
}

/// The per-job key, known to every authenticated rank and the master, never written as is.
#[derive(Clone, PartialEq, Eq)]
pub struct JobKey([u8; 32]);

impl std::fmt::Debug for JobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobKey(..)")
    }
}

impl JobKey {
    pub fn random() -> JobKey {
        JobKey(random_bytes())
    }

    fn derive(&self, what: &str) -> [u8; 32] {
        let hk = hkdf::Hkdf::<Sha256>::new(None, &self.0);
        let mut out = [0u8; 32];
        hk.expand(format!("ray-launch/1 {what}").as_bytes(), &mut out)
            .expect("32 bytes is a valid HKDF length");
        out
    }

    /// The keys of one connection's frames after its handshake, (master → rank, rank →
    /// master): HKDF over the job key, salted with both nonces of the handshake, so a frame of
    /// one connection or direction is no frame of another.
    pub fn channel_keys(&self, master_nonce: &str, rank_nonce: &str) -> ([u8; 32], [u8; 32]) {
        let salt = format!("{master_nonce}:{rank_nonce}");
        let hk = hkdf::Hkdf::<Sha256>::new(Some(salt.as_bytes()), &self.0);
        let (mut m2r, mut r2m) = ([0u8; 32], [0u8; 32]);
        hk.expand(b"ray-launch/1 channel master->rank", &mut m2r)
            .expect("32 bytes is a valid HKDF length");
        hk.expand(b"ray-launch/1 channel rank->master", &mut r2m)
            .expect("32 bytes is a valid HKDF length");
        (m2r, r2m)
    }

    /// Ray's token: 64 hex characters.
    pub fn ray_token(&self) -> String {
        hex(&self.derive("ray token"))
    }

    /// The engine's API key (vLLM `VLLM_API_KEY`, the client's `OPENAI_API_KEY`).
    pub fn api_key(&self) -> String {
        format!("rl-{}", hex(&self.derive("api key")))
    }
}

/// What both ends of one connection bind their proofs to.
#[derive(Debug, Clone)]
pub struct Binding<'a> {
    pub job: &'a str,
    pub step: &'a str,
    pub node_rank: usize,
    pub node: &'a str,
    /// The master's nonce for this connection (in its Challenge).
    pub master_nonce: &'a str,
    /// The master's nonce for the whole job (in its Challenge); the secret method derives the
    /// job key from it.
    pub job_nonce: &'a str,
    /// The rank's nonce (in its Hello).
    pub rank_nonce: &'a str,
    /// SHA-256 of the rank's Hello without its proof.
    pub hello: &'a str,
}

impl Binding<'_> {
    /// The transcript for `label` (`rank` / `master`), with the master's `outcome`.
    pub fn transcript(&self, label: &str, outcome: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        let rank = self.node_rank.to_string();
        for f in [
            "ray-launch/1",
            label,
            self.job,
            self.step,
            &rank,
            self.node,
            self.master_nonce,
            self.job_nonce,
            self.rank_nonce,
            self.hello,
            outcome,
        ] {
            h.update((f.len() as u64).to_be_bytes());
            h.update(f.as_bytes());
        }
        h.finalize().into()
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The secret method's job key: HKDF(secret, salt = job nonce, info = job and step).
fn secret_job_key(secret: &[u8], job: &str, step: &str, job_nonce: &str) -> JobKey {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(job_nonce.as_bytes()), secret);
    let mut out = [0u8; 32];
    hk.expand(
        format!("ray-launch/1 job key {job} {step}").as_bytes(),
        &mut out,
    )
    .expect("32 bytes is a valid HKDF length");
    JobKey(out)
}

/// One side's authenticator.
#[derive(Debug, Clone)]
pub struct Auth {
    pub method: Method,
    uid: u32,
    /// Only the master: the job key it hands out (munge) or derives (secret).
    master_key: Option<JobKey>,
}

const MUNGE_WITHIN: Duration = Duration::from_secs(10);

impl Auth {
    pub fn new(method: Method) -> Auth {
        Auth {
            method,
            uid: nix::unistd::getuid().as_raw(),
            master_key: None,
        }
    }

    /// The master's authenticator, holding the job's key (random for munge).
    pub fn for_master(method: Method) -> Auth {
        let mut a = Auth::new(method);
        if a.method == Method::Munge {
            a.master_key = Some(JobKey::random());
        }
        a
    }

    /// The rank's proof for its Hello.
    pub async fn rank_proof(&self, b: &Binding<'_>) -> Result<Option<String>, String> {
        let t = b.transcript("rank", "");
        match &self.method {
            Method::Off => Ok(None),
            Method::Secret(k) | Method::Local(k) => Ok(Some(hex(&hmac(k, &t)))),
            Method::Munge => munge(&hex(&t), self.uid).await.map(Some),
        }
    }

    /// Check a rank's proof (on the master).
    pub async fn check_rank(&self, b: &Binding<'_>, proof: Option<&str>) -> Result<(), String> {
        let t = b.transcript("rank", "");
        match (&self.method, proof) {
            (Method::Off, _) => Ok(()),
            (_, None) => Err("no proof in its hello".into()),
            (Method::Secret(k) | Method::Local(k), Some(p)) => {
                let ok = unhex(p).is_some_and(|p| ct_eq(&p, &hmac(k, &t)));
                ok.then_some(()).ok_or_else(|| {
                    "its proof does not verify (another user, job or step, or a replay)".into()
                })
            }
            (Method::Munge, Some(p)) => {
                let payload = self.unmunge_own(p).await?;
                if !ct_eq(payload.as_bytes(), hex(&t).as_bytes()) {
                    return Err("its munge credential is for another job, step, rank or connection (a replay?)".into());
                }
                Ok(())
            }
        }
    }

    /// The master's answer proof for `outcome` (`accepted` or the refusal).
    pub async fn master_proof(
        &self,
        b: &Binding<'_>,
        outcome: &str,
    ) -> Result<Option<String>, String> {
        let t = b.transcript("master", outcome);
        match &self.method {
            Method::Off => Ok(None),
            Method::Secret(k) | Method::Local(k) => Ok(Some(hex(&hmac(k, &t)))),
            Method::Munge => {
                let key = self.master_key.as_ref().expect("the master holds the key");
                munge(&format!("{}:{}", hex(&t), hex(&key.0)), self.uid)
                    .await
                    .map(Some)
            }
        }
    }

    /// Check the master's answer (on a rank); the job key on success (`None` with auth off).
    pub async fn check_master(
        &self,
        b: &Binding<'_>,
        outcome: &str,
        proof: Option<&str>,
    ) -> Result<Option<JobKey>, String> {
        let t = b.transcript("master", outcome);
        match (&self.method, proof) {
            (Method::Off, _) => Ok(None),
            (_, None) => Err("its answer carries no proof".into()),
            (Method::Secret(k) | Method::Local(k), Some(p)) => {
                if unhex(p).is_some_and(|p| ct_eq(&p, &hmac(k, &t))) {
                    Ok(Some(secret_job_key(k, b.job, b.step, b.job_nonce)))
                } else {
                    Err("its proof does not verify: not this job's master".into())
                }
            }
            (Method::Munge, Some(p)) => {
                let payload = self.unmunge_own(p).await?;
                let (th, kh) = payload.split_once(':').unwrap_or((&payload, ""));
                if !ct_eq(th.as_bytes(), hex(&t).as_bytes()) {
                    return Err("its munge credential is for another job, step or connection: not this job's master".into());
                }
                let key: [u8; 32] = unhex(kh)
                    .and_then(|k| k.try_into().ok())
                    .ok_or("its munge credential carries no job key")?;
                Ok(Some(JobKey(key)))
            }
        }
    }

    /// The job key as the master knows it (for its own processes: the API key file).
    pub fn master_job_key(&self, job: &str, step: &str, job_nonce: &str) -> Option<JobKey> {
        match &self.method {
            Method::Off => None,
            Method::Munge => self.master_key.clone(),
            Method::Secret(k) | Method::Local(k) => Some(secret_job_key(k, job, step, job_nonce)),
        }
    }

    /// Decode a munge credential that must come from this user: its payload.
    async fn unmunge_own(&self, cred: &str) -> Result<String, String> {
        let (uid, payload) = unmunge(cred).await?;
        if uid != self.uid {
            return Err(format!(
                "its munge credential is from uid {uid}, not this job's user (uid {})",
                self.uid
            ));
        }
        Ok(payload)
    }
}

async fn run_with_input(program: &str, args: &[String], input: &[u8]) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_vec();
    let feed = async move {
        let _ = stdin.write_all(&input).await;
        drop(stdin);
    };
    let out = tokio::time::timeout(MUNGE_WITHIN, async {
        feed.await;
        child.wait_with_output().await
    })
    .await
    .map_err(|_| {
        format!(
            "{program} did not answer within {}s",
            MUNGE_WITHIN.as_secs()
        )
    })?
    .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        // unmunge says why on stdout (`STATUS: Replayed credential (17)`), munge on stderr
        let so = String::from_utf8_lossy(&out.stdout);
        let status = so
            .lines()
            .find_map(|l| l.strip_prefix("STATUS:"))
            .map(str::trim);
        let err = String::from_utf8_lossy(&out.stderr);
        let why = status
            .map(str::to_string)
            .unwrap_or_else(|| err.trim().to_string());
        return Err(format!("{program}: {why}"));
    }
    Ok(out.stdout)
}

/// A credential for `payload`, decodable only by `uid`.
async fn munge(payload: &str, uid: u32) -> Result<String, String> {
    let out = run_with_input(
        "munge",
        &[format!("--restrict-uid={uid}"), "--ttl=120".into()],
        payload.as_bytes(),
    )
    .await?;
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

/// Decode a credential: (creator's uid, payload). Refuses replays, expired and foreign ones.
async fn unmunge(cred: &str) -> Result<(u32, String), String> {
    if cred.len() > 8192 || !cred.starts_with("MUNGE:") {
        return Err("its proof is not a munge credential".into());
    }
    let out = run_with_input("unmunge", &["--keys=STATUS,UID".into()], cred.as_bytes())
        .await
        .map_err(|e| format!("its munge credential does not decode ({e})"))?;
    let text = String::from_utf8_lossy(&out);
    let (meta, payload) = text.split_once("\n\n").unwrap_or((&text, ""));
    // `UID:             alice (1001)`
    let uid = meta
        .lines()
        .find_map(|l| l.strip_prefix("UID:"))
        .and_then(|v| {
            let v = v.trim();
            let n = v
                .rsplit_once('(')
                .map_or(v, |(_, r)| r.trim_end_matches(')'));
            n.trim().parse::<u32>().ok()
        })
        .ok_or("unmunge printed no UID")?;
    Ok((uid, payload.to_string()))
}

/// Whether munge works here (a munged answers).
pub fn munge_works() -> bool {
    std::process::Command::new("munge")
        .arg("--no-input")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Where the per-user secret file is looked for.
pub fn default_secret_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/ray-launch/secret"))
}

/// Read the per-user secret: at least 16 bytes, from a regular file owned by this user that
/// nobody else may read.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    let data = read_private_file(path)?;
    if data.len() < 16 {
        return Err(format!(
            "{} holds {} bytes; a secret needs at least 16",
            path.display(),
            data.len()
        ));
    }
    Ok(data)
}

/// An API key from a file of yours that only you can read: one word of text.
pub fn read_key_file(path: &Path) -> Result<String, String> {
    let data = read_private_file(path)?;
    let key = String::from_utf8(data).map_err(|_| format!("{} is not text", path.display()))?;
    if key.is_empty() || key.contains(|c: char| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{} does not hold one word (put only the key in it)",
            path.display()
        ));
    }
    Ok(key)
}

/// A regular file of yours, mode 0600 or stricter, trimmed.
fn read_private_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::MetadataExt as _;
    let md = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let uid = nix::unistd::getuid().as_raw();
    if !md.file_type().is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if md.uid() != uid {
        return Err(format!(
            "{} belongs to uid {}, not to you (uid {uid})",
            path.display(),
            md.uid()
        ));
    }
    if md.mode() & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:o}: others may read it (chmod 600 it)",
            path.display(),
            md.mode() & 0o777
        ));
    }
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(data.trim_ascii().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding<'a>(rank_nonce: &'a str) -> Binding<'a> {
        Binding {
            job: "7",
            step: "0",
            node_rank: 1,
            node: "node2",
            master_nonce: "m",
            job_nonce: "j",
            rank_nonce,
            hello: "h",
        }
    }

    #[tokio::test]
    async fn secret_proofs_verify_only_for_the_same_binding_and_secret() {
        let a = Auth::new(Method::Secret(b"0123456789abcdef".to_vec()));
        let b = binding("r");
        let p = a.rank_proof(&b).await.unwrap();
        assert!(a.check_rank(&b, p.as_deref()).await.is_ok());
        // another step, rank, nonce, secret, or no proof at all: refused
        let other_step = Binding {
            step: "1",
            ..b.clone()
        };
        assert!(a.check_rank(&other_step, p.as_deref()).await.is_err());
        let other_rank = Binding {
            node_rank: 2,
            ..b.clone()
        };
        assert!(a.check_rank(&other_rank, p.as_deref()).await.is_err());
        assert!(a.check_rank(&binding("r2"), p.as_deref()).await.is_err());
        let stranger = Auth::new(Method::Secret(b"another secret!!".to_vec()));
        assert!(stranger.check_rank(&b, p.as_deref()).await.is_err());
        assert!(a.check_rank(&b, None).await.is_err());
        assert!(a.check_rank(&b, Some("zz")).await.is_err());
        // the master's answer is bound to its outcome; both ends derive the same key
        let m = Auth::for_master(a.method.clone());
        let mp = m.master_proof(&b, "accepted").await.unwrap();
        let key = a.check_master(&b, "accepted", mp.as_deref()).await.unwrap();
        assert_eq!(key, m.master_job_key(b.job, b.step, b.job_nonce));
        assert!(a.check_master(&b, "refused", mp.as_deref()).await.is_err());
        assert!(stranger
            .check_master(&b, "accepted", mp.as_deref())
            .await
            .is_err());
        // a rank's proof is not a master's answer
        assert!(a.check_master(&b, "", p.as_deref()).await.is_err());
    }

    #[test]
    fn derived_secrets_differ_and_have_the_expected_shape() {
        let k = JobKey::random();
        let t = k.ray_token();
        assert_eq!(t.len(), 64);
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(k.api_key().starts_with("rl-"));
        assert_ne!(k.api_key()[3..], t);
        assert_ne!(JobKey::random().ray_token(), t);
        assert_eq!(format!("{k:?}"), "JobKey(..)");
    }

    #[test]
    fn the_secret_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_secret_file(&p).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&p).unwrap(), b"0123456789abcdef0123");
        std::fs::write(&p, "short").unwrap();
        assert!(read_secret_file(&p).unwrap_err().contains("at least 16"));
    }
}
