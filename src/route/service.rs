//! A service's router (`ray-launch route --service NAME`): one URL for a whole chain of jobs.
//! Its replicas are slots; the service file (read when it changes, looked at every quarter
//! second) says which jobs serve, and each serving job takes a free slot (its router's URL),
//! so its requests start at once. A job that drains (handing over, or the service stopped)
//! gets no new request; its slot is freed once nothing is in flight there and the job is no
//! longer serving. Jobs are told apart by `x-ray-launch-job`, which their routers set.

use super::{log, Shared};
use crate::service::{read_file, JobState, ServiceFile};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Every slot out of the rotation until a job takes it.
pub(super) fn hold_all(st: &Shared) {
    for r in &st.replicas {
        if let Ok(mut h) = r.health.lock() {
            h.on_state(
                Some("no job of the service holds this slot".into()),
                Instant::now(),
            );
        }
    }
}

/// What to do with the slots: (slot, job to take it) to fill, slots to hold, slots to free.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Moves {
    pub fill: Vec<(usize, String, String)>,
    pub hold: Vec<(usize, String)>,
    pub free: Vec<usize>,
}

/// The slots' moves, pure: `slots` is each slot's job (none: free) and requests in flight.
pub(super) fn moves(sf: &ServiceFile, slots: &[(Option<String>, usize)]) -> Moves {
    let mut m = Moves::default();
    let serving = |job: &str| {
        sf.job(job)
            .filter(|j| j.state == JobState::Serving && !sf.stopped)
            .is_some()
    };
    for (i, (job, in_flight)) in slots.iter().enumerate() {
        let Some(job) = job else { continue };
        if serving(job) {
            continue;
        }
        let state = sf.job(job).map_or("gone", |j| j.state.as_str());
        let over = sf.job(job).is_none_or(|j| j.state.is_over());
        if over && *in_flight == 0 {
            m.free.push(i);
        } else if sf.stopped {
            m.hold
                .push((i, format!("job {job}: the service was stopped")));
        } else {
            m.hold.push((i, format!("job {job} is {state}")));
        }
    }
    let mut free = slots
        .iter()
        .enumerate()
        .filter(|(_, (j, _))| j.is_none())
        .map(|(i, _)| i);
    for j in sf.serving() {
        if sf.stopped || slots.iter().any(|(s, _)| s.as_deref() == Some(&j.job)) {
            continue;
        }
        let Some(url) = &j.url else { continue };
        match free.next() {
            Some(i) => m.fill.push((i, j.job.clone(), url.clone())),
            None => log(&format!(
                "no free slot for job {} (raise --slots): it gets no request",
                j.job
            )),
        }
    }
    m
}

/// Follow the service file for as long as the router runs.
pub(super) async fn follow(st: Arc<Shared>, dir: PathBuf) {
    let path = dir.join("service.json");
    let mut seen: Option<(SystemTime, u64)> = None;
    let mut last = ServiceFile::default();
    loop {
        let stamp = std::fs::metadata(&path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp.is_some() && stamp != seen {
            if let Ok(sf) = read_file(&path, "") {
                seen = stamp;
                last = sf;
            }
        }
        // in-flight counts change without the file: a drained slot is freed when it empties
        let slots: Vec<(Option<String>, usize)> = st
            .replicas
            .iter()
            .map(|r| (r.job(), r.outstanding.load(Ordering::Relaxed)))
            .collect();
        apply(&st, moves(&last, &slots));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn apply(st: &Shared, m: Moves) {
    let now = Instant::now();
    for (i, why) in m.hold {
        st.update_health(i, |h| h.on_state(Some(why), now));
    }
    for i in m.free {
        let r = &st.replicas[i];
        log(&format!(
            "slot {i}: job {} is done here",
            r.job().unwrap_or_default()
        ));
        if let Ok(mut j) = r.job.write() {
            *j = None;
        }
        if let Ok(mut b) = r.base.write() {
            b.clear();
        }
        if let Ok(mut c) = r.card.lock() {
            *c = None;
        }
    }
    for (i, job, url) in m.fill {
        let r = &st.replicas[i];
        if let Ok(mut b) = r.base.write() {
            *b = url
                .trim_end_matches('/')
                .trim_end_matches("/v1")
                .to_string();
        }
        if let Ok(mut j) = r.job.write() {
            *j = Some(job.clone());
        }
        log(&format!("slot {i}: job {job} serves at {url}"));
        // the job's master called it serving: in the rotation now (the polls follow)
        st.update_health(i, |h| {
            h.on_poll(Ok(()), now);
            h.on_state(None, now)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Job;

    fn job(id: &str, state: JobState) -> Job {
        Job {
            job: id.into(),
            state,
            url: Some(format!("http://n{id}:8000/v1")),
            ..Default::default()
        }
    }

    #[test]
    fn a_successor_takes_a_free_slot_and_the_drained_job_leaves_when_empty() {
        let mut sf = ServiceFile {
            name: "s".into(),
            jobs: vec![job("1", JobState::Serving), job("2", JobState::Starting)],
            ..Default::default()
        };
        let m = moves(&sf, &[(None, 0), (None, 0)]);
        assert_eq!(m.fill, vec![(0, "1".into(), "http://n1:8000/v1".into())]);
        // the successor serves, the first drains: both held in their slots, the new one filled
        sf.jobs = vec![job("1", JobState::Draining), job("2", JobState::Serving)];
        let m = moves(&sf, &[(Some("1".into()), 3), (None, 0)]);
        assert_eq!(m.hold, vec![(0, "job 1 is draining".into())]);
        assert_eq!(m.fill, vec![(1, "2".into(), "http://n2:8000/v1".into())]);
        // ended, but requests still in flight there: held; then freed
        sf.jobs[0].state = JobState::Ended;
        let slots = [(Some("1".into()), 1), (Some("2".into()), 0)];
        assert_eq!(moves(&sf, &slots).hold, vec![(0, "job 1 is ended".into())]);
        let slots = [(Some("1".into()), 0), (Some("2".into()), 0)];
        let m = moves(&sf, &slots);
        assert_eq!(m.free, vec![0]);
        assert!(m.fill.is_empty() && m.hold.is_empty());
    }

    #[test]
    fn a_stopped_service_takes_nothing_new() {
        let sf = ServiceFile {
            name: "s".into(),
            stopped: true,
            jobs: vec![job("1", JobState::Serving)],
        };
        let m = moves(&sf, &[(None, 0)]);
        assert!(m.fill.is_empty());
        let m = moves(&sf, &[(Some("1".into()), 0)]);
        assert_eq!(m.hold, vec![(0, "job 1: the service was stopped".into())]);
    }
}
