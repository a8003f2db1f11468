use super::*;
use crate::{
    client::{self, ClientError, SessionsCommand},
    dataplane::MemStore,
    owner::{answer_delete, answer_list},
    sessions::{Deleted, RuleNames, SessionFilter, SessionList},
};
use hyper::Method;
use nat_common::conntrack::{FlowKey, Session, NO_RULE, SESSION_SNAT};

fn session(port: u16) -> (FlowKey, Session) {
    let key = FlowKey {
        src: [198, 18, 0, 2],
        dst: [203, 0, 113, 5],
        sport: port.to_be_bytes(),
        dport: 123u16.to_be_bytes(),
        proto: 17,
        _pad: [0; 3],
    };
    let s = Session {
        translated: FlowKey {
            src: [198, 51, 100, 1],
            ..key
        },
        dnat_rule: NO_RULE,
        snat_rule: 0,
        flags: SESSION_SNAT,
        ..Default::default()
    };
    (key, s)
}

/// Answers like the real owner, from an in-memory store (`None`: no conntrack).
fn fake_owner(mut store: Option<MemStore>) -> mpsc::Sender<Request> {
    let (tx, mut rx) = mpsc::channel(4);
    let names = RuleNames::new([("private-out".to_string(), 0)]);
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            let store = store
                .as_mut()
                .map(|s| s as &mut dyn crate::dataplane::SessionStore);
            match request {
                Request::ListSessions { query, reply } => {
                    let _ = reply.send(answer_list(store, &names, &query, 0));
                }
                Request::DeleteSessions { filter, reply } => {
                    let _ = reply.send(answer_delete(store, &names, &filter));
                }
                // Rules, status and stats are covered against a real agent
                // (tests/api_contract.rs).
                _ => {}
            }
        }
    });
    tx
}

fn socket_path(label: &str) -> PathBuf {
    std::env::temp_dir()
        .join(format!("nat-agent-api-{}-{label}", std::process::id()))
        .join("agent.sock")
}

fn refused(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Refused { status, message } => (status, message),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_delete_and_flush_over_the_socket() {
    let path = socket_path("round-trip");
    let mut store = MemStore::default();
    for port in [40000, 40001, 40002] {
        let (k, s) = session(port);
        store.insert_session(k, s);
    }
    let server = ApiServer::start(&path, None, fake_owner(Some(store)))
        .await
        .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, SOCKET_MODE);

    let list = |filter: SessionFilter, json| {
        let path = path.clone();
        async move {
            client::run(
                &path,
                &SessionsCommand::List {
                    filter,
                    limit: None,
                    offset: None,
                },
                json,
            )
            .await
        }
    };
    let table = list(SessionFilter::default(), false).await.unwrap();
    assert!(table.ends_with("\n3 sessions\n"), "{table}");
    assert!(table.contains("private-out"), "{table}");
    let json = list(
        SessionFilter {
            port: Some(40001),
            ..Default::default()
        },
        true,
    )
    .await
    .unwrap();
    let parsed: SessionList = serde_json::from_str(&json).unwrap();
    assert_eq!((parsed.matched, parsed.sessions.len()), (1, 1));
    assert_eq!(parsed.sessions[0].snat_rule.as_deref(), Some("private-out"));

    // Bad requests come back as 400 with the reason.
    let (status, message) = refused(
        client::request(&path, Method::GET, "/v1/sessions?prot=tcp")
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 400);
    assert!(message.contains("unknown parameter \"prot\""), "{message}");
    let (status, message) = refused(
        client::request(&path, Method::DELETE, "/v1/sessions")
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 400);
    assert!(message.contains("flush"), "{message}");
    let (status, message) = refused(
        client::request(&path, Method::GET, "/v1/sessions?rule=nope")
            .await
            .unwrap_err(),
    );
    assert_eq!((status, message.as_str()), (400, "no rule named \"nope\""));

    let deleted = client::run(
        &path,
        &SessionsCommand::Delete {
            filter: SessionFilter {
                port: Some(40000),
                ..Default::default()
            },
        },
        false,
    )
    .await
    .unwrap();
    assert_eq!(deleted, "deleted 1 session\n");
    let flushed = client::run(&path, &SessionsCommand::Flush, true)
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Deleted>(&flushed).unwrap(),
        Deleted { deleted: 2 }
    );
    assert!(list(SessionFilter::default(), false)
        .await
        .unwrap()
        .ends_with("0 sessions\n"));

    // A second agent on the same socket is refused; the first keeps serving.
    let err = ApiServer::start(&path, None, fake_owner(None))
        .await
        .err()
        .expect("second bind must fail");
    assert!(format!("{err:#}").contains("another agent"), "{err:#}");
    assert!(list(SessionFilter::default(), false).await.is_ok());

    server.stop();
    assert!(!path.exists(), "socket removed on stop");
    let _ = std::fs::remove_dir(path.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_no_conntrack_is_503() {
    let path = socket_path("stale");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // An agent that died left its socket file behind.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ApiServer::start(&path, None, fake_owner(None))
        .await
        .unwrap();
    let (status, message) = refused(
        client::request(&path, Method::POST, "/v1/sessions/flush")
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 503);
    assert!(message.contains("no connection tracking"), "{message}");
    server.stop();
    let _ = std::fs::remove_dir(path.parent().unwrap());

    // A path that is not a socket is never removed.
    let file = socket_path("not-a-socket");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "x").unwrap();
    let err = ApiServer::start(&file, None, fake_owner(None))
        .await
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("is not a socket"), "{err:#}");
    assert!(file.exists());
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir(file.parent().unwrap());
}
