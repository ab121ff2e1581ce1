//! [`GroupCommit`]: writes that arrive while a commit is in flight share the
//! next one.
//!
//! A commit costs a WAL flush whatever it carries, so a writer that commits
//! one request at a time is bound by flushes, not by work. Here each writer
//! has one queue and one commit in flight: a write arriving while the queue is
//! idle commits at once (there is no timer to wait out), and the writes that
//! arrive meanwhile are taken together, in their order of arrival, by the next
//! commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::{BoxFuture, StoreError};

/// What commits a group: one transaction over all of `jobs`, answering one
/// output per job in the same order.
type CommitFn<J, O> = dyn Fn(Arc<[J]>) -> BoxFuture<'static, Result<Vec<O>, StoreError>> + Send + Sync;

/// A writer's queue of jobs, committed in groups by a task of its own.
///
/// A job whose commit fails alone gets the error; when a group fails, each of
/// its jobs is committed again on its own, so a failing job fails only its own
/// request. Jobs of one *shard* (a room, say) may depend on the ones before
/// them, which they were checked against; so once a job of a shard fails, the
/// later ones of that shard in the group are not run either.
///
/// The queue's task ends once the `GroupCommit` is dropped and the jobs
/// already queued are committed.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use store_core::{GroupCommit, StoreError};
/// # async fn demo() -> Result<(), StoreError> {
/// // Each job is a (shard, number) pair; a real commit runs one transaction.
/// let queue = GroupCommit::spawn("double", 64, |job: &(String, i64)| job.0.as_str(), |jobs| {
///     Box::pin(async move { Ok(jobs.iter().map(|(_, n)| n * 2).collect()) })
/// });
/// assert_eq!(queue.submit(("a".to_owned(), 21)).await?, 42);
/// # Ok(())
/// # }
/// ```
pub struct GroupCommit<J, O> {
    queue: mpsc::UnboundedSender<Queued<J, O>>,
    counters: Arc<Counters>,
    name: &'static str,
}

struct Queued<J, O> {
    job: J,
    answer: oneshot::Sender<Result<O, StoreError>>,
}

#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    jobs: AtomicU64,
    largest: AtomicU64,
    alone_after_failure: AtomicU64,
}

/// How a [`GroupCommit`] has grouped its jobs so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    /// Group commits run (a group that failed and was retried job by job
    /// counts once).
    pub commits: u64,
    /// Jobs taken by those commits.
    pub jobs: u64,
    /// The largest group so far.
    pub largest: u64,
    /// Jobs committed again on their own after their group failed.
    pub alone_after_failure: u64,
}

impl<J, O> std::fmt::Debug for GroupCommit<J, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").field("name", &self.name).field("stats", &self.stats()).finish()
    }
}

impl<J, O> GroupCommit<J, O> {
    /// How jobs were grouped so far.
    pub fn stats(&self) -> GroupCommitStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        GroupCommitStats {
            commits: read(&self.counters.commits),
            jobs: read(&self.counters.jobs),
            largest: read(&self.counters.largest),
            alone_after_failure: read(&self.counters.alone_after_failure),
        }
    }
}

impl<J, O> GroupCommit<J, O>
where
    J: Clone + Send + Sync + 'static,
    O: Send + 'static,
{
    /// Starts the queue's task (on the current Tokio runtime). `name` names it
    /// in logs and errors; a group takes at most `max_group` jobs; `shard`
    /// says which jobs depend on each other; `commit` commits a group.
    pub fn spawn<F>(name: &'static str, max_group: usize, shard: fn(&J) -> &str, commit: F) -> Self
    where
        F: Fn(Arc<[J]>) -> BoxFuture<'static, Result<Vec<O>, StoreError>> + Send + Sync + 'static,
    {
        let (queue, incoming) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let committer = Committer { name, max_group: max_group.max(1), shard, commit: Arc::new(commit) };
        tokio::spawn(committer.run(incoming, Arc::clone(&counters)));
        GroupCommit { queue, counters, name }
    }

    /// Queues `job` now, before the returned future is first polled, so jobs
    /// submitted one after another are committed in that order; the future
    /// answers once the job's commit is known. Dropping the future does not
    /// take the job back.
    pub fn submit(&self, job: J) -> impl Future<Output = Result<O, StoreError>> + Send + use<J, O> {
        let (answer, answered) = oneshot::channel();
        let queued = self.queue.send(Queued { job, answer }).is_ok();
        let name = self.name;
        async move {
            if !queued {
                return Err(abandoned(name, "its writer is shutting down"));
            }
            answered.await.unwrap_or_else(|_| Err(abandoned(name, "its commit task ended before answering")))
        }
    }
}

fn abandoned(interaction: &'static str, reason: &str) -> StoreError {
    StoreError::Abandoned { interaction, reason: reason.to_owned() }
}

struct Committer<J, O> {
    name: &'static str,
    max_group: usize,
    shard: fn(&J) -> &str,
    commit: Arc<CommitFn<J, O>>,
}

impl<J, O> Committer<J, O>
where
    J: Clone + Send + Sync + 'static,
    O: Send + 'static,
{
    async fn run(self, mut incoming: mpsc::UnboundedReceiver<Queued<J, O>>, counters: Arc<Counters>) {
        while let Some(first) = incoming.recv().await {
            let mut group = vec![first];
            while group.len() < self.max_group {
                match incoming.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }
            let size = group.len() as u64;
            counters.commits.fetch_add(1, Ordering::Relaxed);
            counters.jobs.fetch_add(size, Ordering::Relaxed);
            counters.largest.fetch_max(size, Ordering::Relaxed);
            let (jobs, answers): (Vec<J>, Vec<_>) = group.into_iter().map(|q| (q.job, q.answer)).unzip();
            // Shared with the commit rather than copied: only a failed group,
            // committed again job by job, clones its jobs.
            let jobs: Arc<[J]> = jobs.into();
            let outputs = match self.commit_once(Arc::clone(&jobs)).await {
                Ok(outputs) => outputs.into_iter().map(Ok).collect(),
                Err(err) if jobs.len() == 1 => vec![Err(err)],
                Err(err) => {
                    tracing::warn!(
                        queue = self.name,
                        jobs = jobs.len(),
                        "a group commit failed ({err}); committing its jobs one by one"
                    );
                    counters.alone_after_failure.fetch_add(size, Ordering::Relaxed);
                    self.commit_alone(&jobs).await
                }
            };
            for (answer, output) in answers.into_iter().zip(outputs) {
                // The submitter may have gone: its job is committed all the same.
                let _gone = answer.send(output);
            }
        }
    }

    /// Commits `jobs` as one group, in a task of its own, so that a panic
    /// fails this group rather than the queue.
    async fn commit_once(&self, jobs: Arc<[J]>) -> Result<Vec<O>, StoreError> {
        let expected = jobs.len();
        let outputs = tokio::spawn((self.commit)(jobs))
            .await
            .map_err(|err| abandoned(self.name, &format!("its commit panicked or was cancelled: {err}")))??;
        if outputs.len() != expected {
            return Err(abandoned(self.name, "its commit answered for another number of jobs"));
        }
        Ok(outputs)
    }

    async fn commit_alone(&self, jobs: &[J]) -> Vec<Result<O, StoreError>> {
        // The shards whose earlier job failed, and whether it failed because
        // the shard moved to another writer.
        let mut failed_shards: Vec<(String, bool)> = Vec::new();
        let mut outputs = Vec::with_capacity(jobs.len());
        for job in jobs {
            let shard = (self.shard)(job).to_owned();
            if let Some((_, moved)) = failed_shards.iter().find(|(failed, _)| *failed == shard) {
                // A later job of a moved shard moved with it: its caller sends
                // it to the new writer too, in order.
                outputs.push(Err(if *moved {
                    StoreError::Moved { stream: self.name.to_owned(), shard, epoch: 0 }
                } else {
                    abandoned(self.name, "a write before it of the same room failed")
                }));
                continue;
            }
            match self.commit_once(Arc::from(vec![job.clone()])).await {
                Ok(mut output) => outputs.push(Ok(output.remove(0))),
                Err(err) => {
                    failed_shards.push((shard, err.is_moved()));
                    outputs.push(Err(err));
                }
            }
        }
        outputs
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    type Job = (String, i64);

    fn shard(job: &Job) -> &str {
        &job.0
    }

    /// A job whose shard moved to another writer.
    const MOVED: i64 = -100;

    /// The groups a queue committed, each as its jobs' numbers.
    type Groups = Arc<Mutex<Vec<Vec<i64>>>>;

    /// A queue whose commits take 20 ms, record their groups, and fail any
    /// group holding a negative job.
    fn recording() -> (GroupCommit<Job, i64>, Groups) {
        let groups: Groups = Arc::default();
        let seen = Arc::clone(&groups);
        let queue = GroupCommit::spawn("test", 8, shard, move |jobs: Arc<[Job]>| {
            let seen = Arc::clone(&seen);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                seen.lock().unwrap().push(jobs.iter().map(|(_, n)| *n).collect());
                if let Some((shard, _)) = jobs.iter().find(|(_, n)| *n == MOVED) {
                    return Err(StoreError::Moved {
                        stream: "test".to_owned(),
                        shard: shard.clone(),
                        epoch: 2,
                    });
                }
                if jobs.iter().any(|(_, n)| *n < 0) {
                    return Err(StoreError::Misconfigured(format!("negative in {} jobs", jobs.len())));
                }
                Ok(jobs.iter().map(|(_, n)| n * 10).collect())
            })
        });
        (queue, groups)
    }

    fn job(shard: &str, n: i64) -> Job {
        (shard.to_owned(), n)
    }

    #[tokio::test]
    async fn a_lone_job_commits_at_once_and_later_ones_share_the_next_commit() {
        let (queue, groups) = recording();
        let first = queue.submit(job("a", 1));
        tokio::task::yield_now().await;
        let rest: Vec<_> = (2..=12).map(|n| queue.submit(job("b", n))).collect();
        assert_eq!(first.await.unwrap(), 10);
        for (n, answer) in (2..=12).zip(rest) {
            assert_eq!(answer.await.unwrap(), n * 10);
        }
        // In order of submission, at most 8 a group.
        assert_eq!(*groups.lock().unwrap(), vec![vec![1], (2..=9).collect(), (10..=12).collect()]);
        let stats = queue.stats();
        assert_eq!((stats.commits, stats.jobs, stats.largest), (3, 12, 8));
    }

    #[tokio::test]
    async fn a_failing_job_fails_alone_and_stops_only_its_own_shard() {
        let (queue, groups) = recording();
        let blocker = queue.submit(job("z", 0));
        tokio::task::yield_now().await;
        let answers: Vec<_> = [job("a", 1), job("b", -2), job("a", 3), job("b", 4)]
            .into_iter()
            .map(|j| queue.submit(j))
            .collect();
        blocker.await.unwrap();
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.map_err(|err| err.to_string()));
        }
        assert_eq!(outcomes[0], Ok(10));
        assert!(outcomes[1].as_ref().is_err_and(|err| err.contains("negative in 1 jobs")), "{outcomes:?}");
        assert_eq!(outcomes[2], Ok(30));
        assert!(outcomes[3].as_ref().is_err_and(|err| err.contains("same room")), "{outcomes:?}");
        // The group, then each job alone except the one after the failure.
        assert_eq!(*groups.lock().unwrap(), vec![vec![0], vec![1, -2, 3, 4], vec![1], vec![-2], vec![3]]);
        assert_eq!(queue.stats().alone_after_failure, 4);
    }

    #[tokio::test]
    async fn the_jobs_after_one_whose_shard_moved_move_with_it() {
        let (queue, _groups) = recording();
        let blocker = queue.submit(job("z", 0));
        tokio::task::yield_now().await;
        let answers: Vec<_> =
            [job("a", MOVED), job("a", 3), job("b", 4)].into_iter().map(|j| queue.submit(j)).collect();
        blocker.await.unwrap();
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await);
        }
        assert!(outcomes[0].as_ref().is_err_and(StoreError::is_moved), "{outcomes:?}");
        // Moved too, so that its caller sends it after the first, not fails it.
        assert!(outcomes[1].as_ref().is_err_and(StoreError::is_moved), "{outcomes:?}");
        assert_eq!(outcomes[2].as_ref().ok(), Some(&40));
    }

    #[tokio::test]
    async fn a_panicking_commit_fails_its_group_and_the_queue_goes_on() {
        let queue = GroupCommit::spawn("panics", 8, shard, |jobs: Arc<[Job]>| {
            Box::pin(async move {
                assert!(jobs[0].1 != 7, "seven");
                Ok(jobs.iter().map(|(_, n)| *n).collect())
            })
        });
        let err = queue.submit(job("a", 7)).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert_eq!(queue.submit(job("a", 8)).await.unwrap(), 8);
    }

    #[tokio::test]
    async fn a_dropped_submitter_does_not_take_its_job_back() {
        let (queue, groups) = recording();
        drop(queue.submit(job("a", 5)));
        assert_eq!(queue.submit(job("a", 6)).await.unwrap(), 60);
        assert_eq!(groups.lock().unwrap().concat(), vec![5, 6]);
    }
}
