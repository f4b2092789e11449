//! Property tests against the real daemon. The library-level versions, with many
//! more cases, are `handle::tests::constrain_chains_never_widen` and
//! `switchboard/tests/directory_props.rs`.

mod common;

use std::collections::BTreeMap;

use common::*;
use flower_proto::Code;
use flower_proto::transport::Channel;
use proptest::prelude::*;
use prost::encoding::{WireType, encode_key, encode_varint};

const CONSTRAIN: &str = "/flower.protocol.switchboard.Switchboard/Constrain";
const KEYS: [&str; 3] = ["a", "b", "c"];
const VALUES: [&str; 3] = ["1", "2", ""];
const RIGHTS: i32 = 6;

/// A Constrain request as written on the wire: `rights` `None` omits the field,
/// `Some(vec![])` is an empty packed list; a label map `None` omits the field; an
/// entry's `None` key is an omitted key (which decodes as "" and is refused).
#[derive(Debug, Clone)]
struct Raw {
    rights: Option<Vec<i32>>,
    in_labels: Option<Vec<(Option<&'static str>, &'static str)>>,
    out_labels: Option<Vec<(Option<&'static str>, &'static str)>>,
}

fn entries() -> impl Strategy<Value = Option<Vec<(Option<&'static str>, &'static str)>>> {
    let key = prop_oneof![10 => prop::sample::select(&KEYS[..]).prop_map(Some), 1 => Just(None)];
    let entry = (key, prop::sample::select(&VALUES[..]));
    prop::option::of(prop::collection::vec(entry, 0..3))
}

fn raw() -> impl Strategy<Value = Raw> {
    let rights = prop::option::of(prop::collection::vec(
        prop_oneof![10 => 0..RIGHTS, 1 => Just(RIGHTS)],
        0..4,
    ));
    (rights, entries(), entries()).prop_map(|(rights, in_labels, out_labels)| Raw {
        rights,
        in_labels,
        out_labels,
    })
}

fn encode_map(tag: u32, map: &Option<Vec<(Option<&str>, &str)>>, buf: &mut Vec<u8>) {
    for (key, value) in map.iter().flatten() {
        let mut inner = Vec::new();
        for (field, text) in [(1, *key), (2, Some(*value))] {
            if let Some(text) = text {
                encode_key(field, WireType::LengthDelimited, &mut inner);
                encode_varint(text.len() as u64, &mut inner);
                inner.extend_from_slice(text.as_bytes());
            }
        }
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(inner.len() as u64, buf);
        buf.extend(inner);
    }
}

fn encode(raw: &Raw) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(rights) = &raw.rights {
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(rights.len() as u64, &mut buf);
        rights
            .iter()
            .for_each(|r| encode_varint(*r as u64, &mut buf));
    }
    encode_map(2, &raw.in_labels, &mut buf);
    encode_map(3, &raw.out_labels, &mut buf);
    buf
}

/// A handle as seen from outside: which rights it holds and which labels it fixes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    rights: Vec<bool>,
    in_labels: BTreeMap<&'static str, &'static str>,
    out_labels: BTreeMap<&'static str, &'static str>,
}

/// Sends every request on `ch` at once, then collects the replies by call id.
async fn calls(
    ch: &Channel,
    requests: &[Vec<u8>],
) -> Vec<(i32, String, Vec<std::os::fd::OwnedFd>)> {
    for (id, message) in requests.iter().enumerate() {
        send_raw(ch, &call_frame(id as u64, CONSTRAIN, message.clone()), &[]).await;
    }
    let mut replies: Vec<Option<_>> = (0..requests.len()).map(|_| None).collect();
    for _ in requests {
        let (reply, fds) = recv_reply(ch).await.expect("the handle answers");
        replies[reply.id as usize] = Some((reply.code, reply.error, fds));
    }
    replies.into_iter().map(Option::unwrap).collect()
}

/// Probes a handle with Constrain alone: `[r]` succeeds iff it holds right r; in- or
/// out-labels `{k: v}` succeed iff k is not fixed or is fixed to v.
async fn observe(ch: &Channel) -> Seen {
    let mut probes = Vec::new();
    for r in 0..RIGHTS {
        probes.push(encode(&Raw {
            rights: Some(vec![r]),
            in_labels: None,
            out_labels: None,
        }));
    }
    let candidates: Vec<&'static str> = VALUES.iter().copied().chain(["probe"]).collect();
    for side in [0, 1] {
        for key in KEYS {
            for value in &candidates {
                let map = Some(vec![(Some(key), *value)]);
                let (in_labels, out_labels) = match side {
                    0 => (map, None),
                    _ => (None, map),
                };
                probes.push(encode(&Raw {
                    rights: Some(vec![]),
                    in_labels,
                    out_labels,
                }));
            }
        }
    }
    let replies = calls(ch, &probes).await;
    let ok: Vec<bool> = replies.iter().map(|(code, _, _)| *code == 0).collect();
    let mut seen = Seen {
        rights: ok[..RIGHTS as usize].to_vec(),
        in_labels: BTreeMap::new(),
        out_labels: BTreeMap::new(),
    };
    let mut rest = ok[RIGHTS as usize..].chunks(candidates.len());
    for side in [&mut seen.in_labels, &mut seen.out_labels] {
        for key in KEYS {
            let answers = rest.next().unwrap();
            if answers.iter().all(|ok| *ok) {
                continue;
            }
            let fixed: Vec<_> = candidates
                .iter()
                .zip(answers)
                .filter(|(_, ok)| **ok)
                .collect();
            assert_eq!(
                fixed.len(),
                1,
                "{key} is fixed to exactly one value: {answers:?}"
            );
            side.insert(key, *fixed[0].0);
        }
    }
    seen
}

/// What docs/PROTOCOL.md §6 (Constrain) says `raw` does to a handle seen as
/// `parent`: the child, or the error code.
fn model(parent: &Seen, raw: &Raw) -> Result<Seen, Code> {
    let wanted = raw.rights.clone().unwrap_or_default();
    if wanted.iter().any(|r| !(0..RIGHTS).contains(r)) {
        return Err(Code::InvalidArgument);
    }
    if wanted.iter().any(|r| !parent.rights[*r as usize]) {
        return Err(Code::PermissionDenied);
    }
    let extend = |fixed: &BTreeMap<&'static str, &'static str>,
                  map: &Option<Vec<(Option<&'static str>, &'static str)>>| {
        // Later entries win, as in any protobuf map.
        let mut request = BTreeMap::new();
        for (key, value) in map.iter().flatten() {
            request.insert(key.unwrap_or(""), *value);
        }
        if request.contains_key("") {
            return Err(Code::InvalidArgument);
        }
        if request
            .iter()
            .any(|(k, v)| fixed.get(k).is_some_and(|w| w != v))
        {
            return Err(Code::PermissionDenied);
        }
        let mut merged = fixed.clone();
        merged.extend(request);
        Ok(merged)
    };
    let in_labels = extend(&parent.in_labels, &raw.in_labels)?;
    let out_labels = extend(&parent.out_labels, &raw.out_labels)?;
    Ok(Seen {
        rights: (0..RIGHTS).map(|r| wanted.contains(&r)).collect(),
        in_labels,
        out_labels,
    })
}

/// Random chains of Constrain requests sent as raw frames to the daemon: every
/// handle's rights and fixed labels, probed from outside, are never wider than its
/// parent's and are what docs/PROTOCOL.md §6 says; a refused request leaves its
/// parent as it was. The daemon's descriptors return to the baseline afterwards.
#[test]
fn constrain_chains_never_widen_on_the_wire() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let daemon = Daemon::start();
    let root = runtime.block_on(daemon.connect());
    let baseline = runtime.block_on(daemon.baseline(&root));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let chains = prop::collection::vec(raw(), 1..6);
    runner
        .run(&chains, |chain| {
            runtime.block_on(async {
                let mut handle = raw_connect(&daemon.path).await;
                let mut seen = observe(&handle).await;
                prop_assert_eq!(&seen.rights, &vec![true; RIGHTS as usize]);
                for raw in &chain {
                    let expected = model(&seen, raw);
                    let (code, error, mut fds) = calls(&handle, &[encode(raw)]).await.remove(0);
                    match expected {
                        Err(want) => {
                            prop_assert_eq!(Code::from_i32(code), want, "{}", error);
                            prop_assert!(fds.is_empty());
                            let after = observe(&handle).await;
                            prop_assert_eq!(&after, &seen, "a refusal changed the parent");
                        }
                        Ok(want) => {
                            prop_assert_eq!(code, 0, "{:?} refused: {}", raw, error);
                            prop_assert_eq!(fds.len(), 1);
                            let child = Channel::new(fds.remove(0)).unwrap();
                            let got = observe(&child).await;
                            for (held, parent) in got.rights.iter().zip(&seen.rights) {
                                prop_assert!(!*held || *parent, "a right was widened");
                            }
                            for (parent, child) in [
                                (&seen.in_labels, &got.in_labels),
                                (&seen.out_labels, &got.out_labels),
                            ] {
                                for (k, v) in parent {
                                    prop_assert_eq!(child.get(k), Some(v), "fixed {} changed", k);
                                }
                            }
                            prop_assert_eq!(&got, &want);
                            (handle, seen) = (child, got);
                        }
                    }
                }
                Ok(())
            })
        })
        .unwrap();
    drop(root);
    let root = runtime.block_on(daemon.connect());
    runtime.block_on(daemon.settle_fds(baseline));
    drop(root);
}
