//! `flower run`: execute a command with a constrained handle as its only extra
//! descriptor, announced in `FLOWER_SWITCHBOARD_FD` (docs/PROTOCOL.md §12).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use flower_proto::client::Switchboard;
use flower_proto::switchboard::{self as sb, Right};
use flower_proto::{Code, Labels, Status, inherited};
use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// Constrains the handle at `path` (or the inherited one) and executes `command`
/// with it. Returns only on failure.
pub async fn run(
    path: &Path,
    rights: Option<Vec<Right>>,
    in_labels: &Labels,
    out_labels: &Labels,
    command: &[OsString],
) -> Result<()> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| crate::args::UsageError("no command to run".into()))?;
    let switchboard = Switchboard::connect(path).await?;
    let handle = match rights {
        Some(rights) => constrain(&switchboard, &rights, in_labels, out_labels).await?,
        None => keep_rights(&switchboard, in_labels, out_labels).await?,
    };
    drop(switchboard);
    exec(handle, program, args)
}

async fn constrain(
    switchboard: &Switchboard,
    rights: &[Right],
    in_labels: &Labels,
    out_labels: &Labels,
) -> Result<OwnedFd, Status> {
    let request = sb::ConstrainRequest {
        rights: rights.iter().map(|r| *r as i32).collect(),
        in_labels: in_labels.clone(),
        out_labels: out_labels.clone(),
    };
    let (reply, mut fds) = switchboard
        .peer()
        .call::<sb::rpc::Constrain>(&request, Vec::new())
        .await?;
    fds.take(reply.switchboard, "switchboard")
}

/// Constrains to the rights this handle has, whatever they are: asks for all of
/// them, and if the switchboard names some as missing, asks again without those.
async fn keep_rights(
    switchboard: &Switchboard,
    in_labels: &Labels,
    out_labels: &Labels,
) -> Result<OwnedFd> {
    match constrain(switchboard, &Right::ALL, in_labels, out_labels).await {
        Ok(fd) => Ok(fd),
        Err(status) if status.code == Code::PermissionDenied => {
            let missing = missing_rights(&status.message).ok_or_else(|| anyhow!("{status}"))?;
            let held: Vec<Right> = Right::ALL
                .into_iter()
                .filter(|r| !missing.contains(r))
                .collect();
            Ok(constrain(switchboard, &held, in_labels, out_labels).await?)
        }
        Err(status) => Err(status.into()),
    }
}

/// The rights named in `Rights ["A","B"] are not present on this handle`.
fn missing_rights(message: &str) -> Option<Vec<Right>> {
    let list = message
        .strip_prefix("Rights ")?
        .strip_suffix(" are not present on this handle")?;
    let names: Vec<String> = serde_json::from_str(list).ok()?;
    names.iter().map(|n| Right::from_str_name(n)).collect()
}

/// Replaces this process with `program`: every descriptor but 0, 1, 2 and `handle`
/// is marked close-on-exec first, so nothing else leaks into the child.
fn exec(handle: OwnedFd, program: &OsString, args: &[OsString]) -> Result<()> {
    let raw = handle.as_raw_fd();
    for fd in open_descriptors()? {
        if fd > 2 && fd != raw {
            // A descriptor that closed meanwhile (the listing's own) is fine.
            let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        }
    }
    fcntl(raw, FcntlArg::F_SETFD(FdFlag::empty())).context("cannot pass the handle on")?;
    let error = std::process::Command::new(program)
        .args(args)
        .env(inherited::ENV, raw.to_string())
        // The handle is the child's way in; a path would be a second one.
        .env_remove("FLOWER_SWITCHBOARD")
        .exec();
    Err(anyhow!("cannot run {}: {error}", program.to_string_lossy()))
}

fn open_descriptors() -> Result<Vec<RawFd>> {
    let entries =
        std::fs::read_dir("/proc/self/fd").context("cannot list descriptors in /proc/self/fd")?;
    Ok(entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_rights_are_read_from_the_design_error() {
        let m = r#"Rights ["EGRESS_START","INGRESS_CONNECT"] are not present on this handle"#;
        assert_eq!(
            missing_rights(m),
            Some(vec![Right::EgressStart, Right::IngressConnect])
        );
        assert_eq!(missing_rights("something else"), None);
    }
}
