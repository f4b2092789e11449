//! A registrant that has just exited does not block its successor. A file of its own:
//! another test spawning a process at the same moment would hold a copy of the
//! registrant's descriptor between fork and exec, so that its close would not yet be
//! a hang-up the switchboard can see.

mod common;

use common::*;
use flower_proto::Code;

/// A registrant that exits and a successor that registers the same labels at once
/// (a one-shot `flower cat -l` in a loop): the successor is not refused because the
/// daemon has not yet seen the first one's channel close. A live target still refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_may_register_as_soon_as_its_predecessor_has_exited() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let filter = labels(&[("app", "again")]);
    let baseline = daemon.baseline(&root).await;
    let dir = tempfile::tempdir().unwrap();
    for round in 0..30 {
        let ready = dir.path().join(format!("ready-{round}"));
        let mut one_shot = std::process::Command::new("bash")
            .args([
                "-c",
                r#"exec "$0" cat -l --ready-fd 3 "$1" app=again 3>"$2""#,
            ])
            .arg(FLOWER)
            .arg(&daemon.path)
            .arg(&ready)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::fs::read(&ready).map_or(true, |r| r.is_empty()) {
            if let Some(status) = one_shot.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut one_shot.stderr.take().unwrap(), &mut err)
                    .unwrap();
                panic!("round {round}: the one-shot server exited ({status}): {err}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: never ready"
            );
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        if round == 0 {
            let refused = root
                .server_start(&filter)
                .await
                .err()
                .expect("a live one refuses");
            assert_eq!(refused.code, Code::FailedPrecondition);
        }
        drop(root.client_connect(&filter).await.unwrap());
        assert!(one_shot.wait().unwrap().success(), "round {round}");
    }
    wait_until_async("the last one's removal", || async {
        list(&root, &filter).await.is_empty()
    })
    .await;

    // The tight version of the same race: a blocking registrant closes its
    // registration channel (synchronously) and registers again on the next line.
    let path = daemon.path.clone();
    tokio::task::spawn_blocking(move || {
        let mut sb = flower_proto::blocking::Switchboard::connect(&path).unwrap();
        let again = labels(&[("app", "again")]);
        for round in 0..300 {
            let server = sb.server_start(&again).unwrap();
            drop(server);
            if let Err(e) = sb.server_start(&again) {
                panic!("round {round}: the successor was refused: {e}");
            }
        }
    })
    .await
    .unwrap();
    daemon.settle_fds(baseline).await;
}
