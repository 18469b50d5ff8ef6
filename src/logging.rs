//! ray-launch's own log lines on stderr: `HH:MM:SS.mmm LEVEL [rank node] message`, so the
//! interleaved output of every node in srun's stream says where each line comes from.

use std::fmt;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

struct Prefixed {
    prefix: String,
}

impl<S, N> FormatEvent<S, N> for Prefixed
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let level = event.metadata().level();
        write!(w, "{} {:<5} [{}] ", &now[11..23], level, self.prefix)?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

pub fn init(rank: usize, node: &str) {
    let filter = EnvFilter::try_from_env(crate::env_vars::RAY_LAUNCH_LOG)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(Prefixed {
            prefix: format!("{rank} {node}"),
        })
        .try_init();
}
