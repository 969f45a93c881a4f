//! The journal on NATS JetStream (`[cluster]`), against a real nats-server: every record
//! in the stream before its answer, in the local journal's order; the stream out of
//! reach answers 91 and nothing else changes.

use std::time::Duration;

use payswitch::cluster::ClusterConfig;
use payswitch::journal::record::decode_frame;
use payswitch::journal::RecordKind;
use payswitch::switch::RunningSwitch;
use payswitch_loadtest::acquirer_sim::{self, SimConfig};
use payswitch_protocol::Message;
use support::nats::NatsServer;
use support::{acquirer, config, in_front_of};

mod support;

fn authorization(stan: u32) -> Message {
    support::authorization("4111111111111111", stan)
}

/// An approving simulator and a switch configuration in front of it, on `nats`.
async fn sim_and_config(
    nats: &NatsServer,
    ack_timeout_ms: u64,
) -> (acquirer_sim::RunningSim, payswitch::config::Config) {
    let sim = acquirer_sim::start(SimConfig {
        approval_rate: 1.0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut config = config(vec![acquirer("north", &sim, 2_000)], vec![]);
    config.cluster = Some(cluster(nats, ack_timeout_ms));
    (sim, config)
}

fn cluster(nats: &NatsServer, ack_timeout_ms: u64) -> ClusterConfig {
    ClusterConfig {
        servers: vec![nats.url()],
        node: "a".into(),
        stream: "PAYSWITCH_JOURNAL".into(),
        subject_prefix: "payswitch".into(),
        replicas: 1,
        ack_timeout_ms,
        connect_timeout_ms: 5_000,
        stan_block: 0,
        lease_ms: 3_000,
        events: true,
        shared_velocity: true,
        stream_max_age_days: 30,
    }
}

/// One authorization on its own QUIC stream: its response code.
async fn response_code(switch: &RunningSwitch, stan: u32) -> String {
    let response = support::transact(&support::gateway(switch).await, &authorization(stan)).await;
    response.get_str(39).unwrap_or_default().to_string()
}

/// Every record in the stream, in stream order: (journal sequence, kind), and the subject
/// and message id of each message.
async fn stream_records(nats: &NatsServer) -> (Vec<(u64, RecordKind)>, Vec<(String, String)>) {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let context = async_nats::jetstream::new(client);
    let mut stream = context.get_stream("PAYSWITCH_JOURNAL").await.unwrap();
    let (first, last) = {
        let state = &stream.info().await.unwrap().state;
        (state.first_sequence, state.last_sequence)
    };
    let mut records = Vec::new();
    let mut messages = Vec::new();
    for seq in first..=last {
        let message = stream.get_raw_message(seq).await.unwrap();
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.to_string())
            .unwrap_or_default();
        messages.push((message.subject.to_string(), id));
        let mut at = 0;
        while at < message.payload.len() {
            let (seq, record, len) = decode_frame(&message.payload[at..]).unwrap();
            records.push((seq, record.kind));
            at += len;
        }
    }
    (records, messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_journal_record_is_in_the_stream_in_the_journals_order() {
    let nats = NatsServer::start();
    let (sim, config) = sim_and_config(&nats, 2_000).await;
    let switch = in_front_of(&sim, config.clone()).await;
    let mut answers = Vec::new();
    for stan in 1..=40 {
        answers.push(response_code(&switch, stan).await);
        if stan <= 10 {
            // One request at a time: by its answer, its three records are in the stream.
            let (replicated, _) = stream_records(&nats).await;
            assert_eq!(replicated.len(), 3 * stan as usize, "after request {stan}");
        }
    }
    assert!(answers.iter().all(|c| c == "00"), "{answers:?}");

    let mut local = Vec::new();
    payswitch::journal::scan(&config.journal.dir, false, |seq, r| {
        local.push((seq, r.kind))
    })
    .unwrap();
    let (replicated, messages) = stream_records(&nats).await;
    // Each answered request has its request, forwarded and response records (120), and
    // the stream holds exactly the local journal, in the same order.
    assert_eq!(local.len(), 120, "{local:?}");
    assert_eq!(replicated, local);
    // What `journal verify --config` and `journal export --config` read: the same.
    let mut read = Vec::new();
    let cluster = config.cluster.as_ref().unwrap();
    let report = payswitch::cluster::read_journal(cluster, None, |node, seq, record| {
        read.push((node.to_string(), seq, record.kind))
    })
    .await
    .unwrap();
    let expected: Vec<_> = local
        .iter()
        .map(|(seq, kind)| ("a".to_string(), *seq, *kind))
        .collect();
    assert_eq!(read, expected);
    let a = &report.nodes["a"];
    assert_eq!(
        (a.first_seq, a.last_seq, a.records, a.missing, a.repeated),
        (1, 120, 120, 0, 0)
    );
    assert_eq!(report.records, 120);
    let other = payswitch::cluster::read_journal(cluster, Some("b"), |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(other.records, 0);
    assert!(messages
        .iter()
        .all(|(subject, _)| subject == "payswitch.journal.a"));
    // Each message is named by its node and first record, so a retried publish is
    // stored once.
    let first_seqs: Vec<String> = messages.iter().map(|(_, id)| id.clone()).collect();
    assert!(
        first_seqs.iter().all(|id| id.starts_with("a:")),
        "{first_seqs:?}"
    );
    let mut unique = first_seqs.clone();
    unique.dedup();
    assert_eq!(unique.len(), first_seqs.len());

    // Operators see it: every message the stream holds was counted as acknowledged.
    let admin = switch.admin_addr.unwrap();
    let stats: serde_json::Value =
        serde_json::from_str(&http_get(admin, "/api/stats").await.1).unwrap();
    let replica = &stats["journal"]["replica"];
    assert_eq!(replica["acknowledged"], messages.len() as u64, "{replica}");
    assert_eq!(replica["failed"], 0, "{replica}");
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "payswitch_journal_replica_acknowledged_total {}",
            messages.len()
        )),
        "{metrics}"
    );
}

/// The status and body of `GET path` from the admin API.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default();
        (status, body)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_stream_out_of_reach_requests_are_answered_91_until_it_is_back() {
    let mut nats = NatsServer::start();
    let (sim, config) = sim_and_config(&nats, 500).await;
    let switch = in_front_of(&sim, config.clone()).await;
    assert_eq!(response_code(&switch, 1).await, "00");

    nats.kill();
    let started = std::time::Instant::now();
    assert_eq!(response_code(&switch, 2).await, "91");
    // Within the ack timeout, and the acquirer never saw it: it was refused before the
    // request left.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Load balancers are told.
    let admin = switch.admin_addr.unwrap();
    let (status, body) = http_get(admin, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("journal stream"), "{body}");

    nats.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut stan = 3;
    loop {
        let code = response_code(&switch, stan).await;
        stan += 1;
        if code == "00" {
            break;
        }
        assert_eq!(code, "91");
        assert!(
            std::time::Instant::now() < deadline,
            "the stream never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = http_get(admin, "/ready").await;
    assert_eq!(status, 200, "{body}");
    // The acquirer saw the two approvals and nothing the gateway was told 91 for — but a
    // request whose forwarded record was acknowledged and whose answer's was not, which
    // it then gets a reversal for.
    let seen = sim
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    let reversed = sim
        .stats
        .reversals
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(seen, 2 + reversed, "requests {seen}, reversals {reversed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_must_hash_card_numbers_with_the_same_key() {
    use std::os::unix::fs::PermissionsExt;
    let nats = NatsServer::start();
    // Node a, the first, makes its journal's key the cluster's.
    let (sim, a) = sim_and_config(&nats, 2_000).await;
    let _a = in_front_of(&sim, a.clone()).await;

    // Node b with a key of its own (its journal directory's new one): refused.
    let node_b = |key_file: Option<std::path::PathBuf>| {
        let mut b = config(vec![acquirer("north", &sim, 2_000)], vec![]);
        b.cluster = Some(ClusterConfig {
            node: "b".into(),
            stan_block: 1,
            ..cluster(&nats, 2_000)
        });
        b.journal.pan_hash_key_file = key_file;
        b
    };
    let security = || payswitch::switch::Security {
        identity: payswitch_net::TlsIdentity::self_signed(&["localhost"]).unwrap(),
        acquirer_trust: vec![support::trust(&sim)],
        gateways: None,
    };
    let refused = payswitch::switch::start(&node_b(None), security())
        .await
        .map(|_| ())
        .unwrap_err();
    let message = format!("{refused:#}");
    assert!(message.contains("journal.pan_hash_key_file"), "{message}");

    // Given a copy of a's key file, readable by its owner only: served.
    let copy = tempfile::tempdir().unwrap().keep().join("pan-hash.key");
    std::fs::copy(a.journal.dir.join("pan.key"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loose = payswitch::switch::start(&node_b(Some(copy.clone())), security())
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(format!("{loose:#}").contains("owner only"), "{loose:#}");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).unwrap();
    let b = in_front_of(&sim, node_b(Some(copy))).await;
    assert_eq!(response_code(&b, 7).await, "00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_that_name_for_other_subjects_is_refused_at_start() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            name: "PAYSWITCH_JOURNAL".into(),
            subjects: vec!["elsewhere.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (sim, config) = sim_and_config(&nats, 2_000).await;
    let security = payswitch::switch::Security {
        identity: payswitch_net::TlsIdentity::self_signed(&["localhost"]).unwrap(),
        acquirer_trust: vec![support::trust(&sim)],
        gateways: None,
    };
    let refused = payswitch::switch::start(&config, security)
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("cluster.stream"),
        "{refused:#}"
    );
}

/// Node `node` (STAN block `block`) of the cluster on `nats`, in front of `sim`, hashing
/// card numbers with the key in `key_file`.
fn node_config(
    nats: &NatsServer,
    sim: &acquirer_sim::RunningSim,
    node: &str,
    block: u8,
    key_file: &std::path::Path,
) -> payswitch::config::Config {
    let mut config = config(vec![acquirer("north", sim, 2_000)], vec![]);
    config.cluster = Some(ClusterConfig {
        node: node.into(),
        stan_block: block,
        ..cluster(nats, 2_000)
    });
    config.journal.pan_hash_key_file = Some(key_file.to_path_buf());
    config
}

/// A PAN hash key file, readable by its owner only, for every node.
fn shared_key_file() -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = tempfile::tempdir().unwrap().keep().join("pan-hash.key");
    std::fs::write(&path, "00112233445566778899aabbccddeeff\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmission_to_another_node_is_answered_from_the_original() {
    let nats = NatsServer::start();
    // Answers take 300 ms: the copy reaches node b while node a's original is still out.
    let sim = acquirer_sim::start(SimConfig {
        approval_rate: 1.0,
        delay: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let key = shared_key_file();
    let a = in_front_of(&sim, node_config(&nats, &sim, "a", 0, &key)).await;
    let b = in_front_of(&sim, node_config(&nats, &sim, "b", 1, &key)).await;
    let (to_a, to_b) = (support::gateway(&a).await, support::gateway(&b).await);

    let request = authorization(501);
    let original = tokio::spawn({
        let request = request.clone();
        async move { support::transact(&to_a, &request).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let copy = support::transact(&to_b, &request).await;
    let original = original.await.unwrap();
    assert_eq!(original.get_str(39), Some("00"));
    assert_eq!(copy.get_str(39), Some("00"), "{copy:?}");
    assert_eq!(
        copy.get_str(38),
        original.get_str(38),
        "the copy carries the original's approval code"
    );
    assert!(
        copy.get_str(48).unwrap_or("").ends_with("dup=1"),
        "{copy:?}"
    );

    // Once answered, a later copy at b is answered at once (from b's own window, which
    // remembers the answer it got from the claim).
    let started = std::time::Instant::now();
    let again = support::transact(&to_b, &request).await;
    assert_eq!(again.get_str(38), original.get_str(38));
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    // A request of b's own is b's to decide, with a STAN from b's block.
    let own = support::transact(&to_b, &authorization(502)).await;
    assert_eq!(own.get_str(39), Some("00"));
    let requests = sim
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(requests, 2, "the acquirer saw each request once");
    let lost = b
        .switch
        .cluster
        .claims_lost
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(lost, 1, "only the first copy asked the cluster");

    // The books: b journaled the copies as duplicates, a the original.
    let mut copies = 0;
    payswitch::journal::scan(b.switch.journal().unwrap().dir(), false, |_, r| {
        if r.kind == RecordKind::Response && r.duplicate {
            copies += 1;
        }
    })
    .unwrap();
    assert_eq!(copies, 2);

    // What operators see: both leases held, b's lost claim, its lease in the metrics.
    let admin = b.admin_addr.unwrap();
    let (status, body) = http_get(admin, "/api/cluster").await;
    assert_eq!(status, 200, "{body}");
    let cluster: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(cluster["node"], "b");
    assert_eq!(cluster["this"]["lease_held"], true, "{cluster}");
    assert_eq!(cluster["this"]["claims_lost"], 1, "{cluster}");
    let nodes: Vec<(String, String)> = cluster["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap().into(),
                n["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        [("a".into(), "held".into()), ("b".into(), "held".into())]
    );
    assert!(
        cluster["stream"]["messages"].as_u64().unwrap() > 0,
        "{cluster}"
    );
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "payswitch_cluster_lease_held 1"),
        "{metrics}"
    );
    assert!(metrics
        .lines()
        .any(|l| l == "payswitch_cluster_claims_lost_total 1"));
    let (status, _) = http_get(admin, "/ready").await;
    assert_eq!(status, 200);
    // A node that is not in a cluster has no /api/cluster.
    let (sim_only, single) = sim_and_config(&nats, 2_000).await;
    let mut single = single;
    single.cluster = None;
    let alone = in_front_of(&sim_only, single).await;
    let (status, _) = http_get(alone.admin_addr.unwrap(), "/api/cluster").await;
    assert_eq!(status, 404);
}

/// The next `n` events a durable consumer `name` is given, acknowledged; their JSON.
async fn take_events(
    context: &async_nats::jetstream::Context,
    name: &str,
    n: usize,
) -> Vec<serde_json::Value> {
    use async_nats::jetstream::consumer;
    use futures_util::StreamExt;
    let stream = context.get_stream("PAYSWITCH_EVENTS").await.unwrap();
    let crm: consumer::PullConsumer = stream
        .get_or_create_consumer(
            name,
            consumer::pull::Config {
                durable_name: Some(name.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                // What a consumer that stopped had been handed and not acknowledged is
                // handed again after this.
                ack_wait: Duration::from_secs(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut messages = crm.messages().await.unwrap();
    let mut events = Vec::new();
    while events.len() < n {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .unwrap();
        events.push(serde_json::from_slice(&message.payload).unwrap());
        message.ack().await.unwrap();
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_an_event_and_a_consumer_resumes_where_it_stopped() {
    let nats = NatsServer::start();
    let (sim, config) = sim_and_config(&nats, 2_000).await;
    let switch = in_front_of(&sim, config.clone()).await;
    for stan in 1..=6 {
        assert_eq!(response_code(&switch, stan).await, "00");
    }
    let client = async_nats::connect(nats.url()).await.unwrap();
    let context = async_nats::jetstream::new(client);
    // A CRM takes three events and stops.
    let first = take_events(&context, "crm", 3).await;
    let stans: Vec<&str> = first.iter().map(|e| e["stan"].as_str().unwrap()).collect();
    assert_eq!(stans, ["000001", "000002", "000003"]);
    let e = &first[0];
    assert_eq!(e["v"], 1);
    assert_eq!(e["node"], "a");
    assert_eq!(e["kind"], "authorization");
    assert_eq!(e["code"], "00");
    assert_eq!(e["acquirer"], "north");
    assert_eq!(e["pan_masked"], "411111******1111");
    assert_eq!(e["amount_minor"], 12500);
    assert!(e["approval_code"].as_str().is_some());
    assert!(!e.to_string().contains("4111111111111111"), "{e}");
    // Two more outcomes while it is away, one a retransmission.
    assert_eq!(response_code(&switch, 7).await, "00");
    assert_eq!(response_code(&switch, 7).await, "00");
    // Back, it resumes after the third: the three it had been handed and not
    // acknowledged come again (after the ack wait: possibly after the new ones, so a
    // consumer orders by `seq`), then the new; none it acknowledged.
    let mut rest = take_events(&context, "crm", 5).await;
    rest.sort_by_key(|e| e["seq"].as_u64().unwrap());
    let stans: Vec<&str> = rest.iter().map(|e| e["stan"].as_str().unwrap()).collect();
    assert_eq!(stans, ["000004", "000005", "000006", "000007", "000007"]);
    assert_eq!(rest[3]["duplicate"], false);
    assert_eq!(rest[4]["duplicate"], true);
    assert!(rest[0]["seq"].as_u64() > first[2]["seq"].as_u64());

    // The node restarts: its feed resumes after its last event, publishing none twice.
    switch.shutdown().await;
    let switch = in_front_of(&sim, config).await;
    assert_eq!(response_code(&switch, 8).await, "00");
    let next = take_events(&context, "crm", 1).await;
    assert_eq!(next[0]["stan"], "000008");
    let mut events = context.get_stream("PAYSWITCH_EVENTS").await.unwrap();
    assert_eq!(events.info().await.unwrap().state.messages, 9);
}

/// Waits (up to 10 s) until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_rules_and_routes_deployed_on_one_node_reach_the_others() {
    use payswitch_loadtest::workload::{self, GenConfig};
    use payswitch_models::train::{self, TrainOptions};
    let nats = NatsServer::start();
    let sim = acquirer_sim::start(SimConfig::default()).await.unwrap();
    let key = shared_key_file();
    let a = in_front_of(&sim, node_config(&nats, &sim, "a", 0, &key)).await;
    let b = in_front_of(&sim, node_config(&nats, &sim, "b", 1, &key)).await;

    // A model deployed on a (here straight into its scoring: the admin API, the models
    // directory and a promotion all end there) becomes b's champion.
    let mut rows = Vec::new();
    workload::write_workload(&GenConfig::new(3_000, 1), &mut rows).unwrap();
    let rows = payswitch_models::data::read_all(rows.as_slice()).unwrap();
    let model = train::train(
        &rows,
        &TrainOptions {
            trees: 5,
            depth: 4,
            ..TrainOptions::default()
        },
    )
    .unwrap();
    let id = model.id().to_string();
    a.switch
        .scoring
        .set_champion(std::sync::Arc::new(model))
        .unwrap();
    eventually("b serves a's champion", || {
        b.switch.scoring.champion().is_some_and(|m| m.id() == id)
    })
    .await;

    // Rules changed on b reach a.
    let rules =
        "[[rule]]\nname = \"huge\"\nwhen = \"amount_minor > 1000000\"\naction = \"decline\"\n";
    b.switch.scoring.rules().apply_text(rules).unwrap();
    eventually("a has b's rules", || {
        a.switch.scoring.rules().text().as_str() == rules
    })
    .await;

    // Routes reloaded on a reach b.
    let routes = vec![payswitch::routing::RouteConfig {
        bins: vec!["4".into()],
        currencies: vec![],
        mccs: vec![],
        acquirers: vec!["north".into()],
        balance: false,
        stand_in: None,
    }];
    a.switch.router.store(std::sync::Arc::new(
        payswitch::routing::Router::new(&["north"], &routes).unwrap(),
    ));
    eventually("b routes as a does", || {
        b.switch.router.load().routes().len() == 1
    })
    .await;

    // A node that starts later serves what the cluster has deployed, not its own files.
    let c = in_front_of(&sim, node_config(&nats, &sim, "c", 2, &key)).await;
    assert_eq!(
        c.switch.scoring.champion().map(|m| m.id().to_string()),
        Some(id)
    );
    assert_eq!(c.switch.scoring.rules().text().as_str(), rules);
    assert_eq!(c.switch.router.load().routes().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cards_velocity_counts_its_transactions_on_every_node() {
    let nats = NatsServer::start();
    let sim = acquirer_sim::start(SimConfig {
        approval_rate: 1.0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let key = shared_key_file();
    // A card's authorization after three within a minute is declined (the window counts
    // the card's earlier transactions).
    let rules = tempfile::tempdir().unwrap().keep().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"burst\"\nwhen = \"card_count_1m >= 3\"\naction = \"decline\"\n",
    )
    .unwrap();
    let node = |name: &str, block: u8| {
        let mut config = node_config(&nats, &sim, name, block, &key);
        config.scoring.rules = Some(rules.clone());
        config
    };
    let a = in_front_of(&sim, node("a", 0)).await;
    let b = in_front_of(&sim, node("b", 1)).await;
    let (to_a, to_b) = (support::gateway(&a).await, support::gateway(&b).await);
    let card = "4111111111111111";
    for stan in 1..=3 {
        let answer = support::transact(&to_a, &support::authorization(card, stan)).await;
        assert_eq!(answer.get_str(39), Some("00"));
    }
    let followed = || {
        b.switch
            .cluster
            .followed
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    eventually("b records a's three", || followed() >= 3).await;
    // The card's fourth, at b: b counts the three it never saw.
    let fourth = support::transact(&to_b, &support::authorization(card, 4)).await;
    assert_eq!(fourth.get_str(39), Some("59"), "{fourth:?}");
    assert!(
        fourth.get_str(48).unwrap_or("").contains("burst"),
        "{fourth:?}"
    );
    // Another card's first, at b: approved.
    let other = support::transact(&to_b, &support::authorization("5500000000000004", 5)).await;
    assert_eq!(other.get_str(39), Some("00"));
    let (_, body) = http_get(b.admin_addr.unwrap(), "/api/cluster").await;
    let cluster: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(cluster["this"]["followed"], 3, "{cluster}");
    assert_eq!(cluster["this"]["follow_dropped"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reversal_after_the_lease_was_taken_over_still_reaches_the_acquirer() {
    use payswitch_protocol::Mti;
    let nats = NatsServer::start();
    let (sim, config) = sim_and_config(&nats, 2_000).await;
    let node = in_front_of(&sim, config).await;
    let conn = support::gateway(&node).await;
    assert_eq!(
        support::transact(&conn, &authorization(60))
            .await
            .get_str(39),
        Some("00")
    );

    // A survivor takes the node's lease over (written as one would: compare-and-set on
    // the revision). The approval was answered durably: nothing in the journal was owed,
    // so the survivor moves nothing for it.
    let fence = node.switch.fence().unwrap().clone();
    let taken = fence.token();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let leases = async_nats::jetstream::new(client)
        .get_key_value("PAYSWITCH_LEASES")
        .await
        .unwrap();
    let entry = leases.entry("lease.a").await.unwrap().unwrap();
    let value = format!(r#"{{"taken_over_by":"b","node":"a","generation":{taken},"at_ms":0}}"#);
    leases
        .update("lease.a", value.into(), entry.revision)
        .await
        .unwrap();
    eventually("the node holds a new lease", || {
        fence.held() && fence.token() > taken
    })
    .await;

    // The gateway reverses the approval, through this node: it is this node's to send.
    let base = authorization(61);
    let mut b = payswitch_protocol::Message::builder(Mti::REVERSAL_REQUEST);
    for n in base.field_numbers() {
        b.set(n, base.get(n).unwrap()).unwrap();
    }
    b.set_str(37, "533000000060").unwrap();
    b.set_str(90, &format!("0100{:06}1125123045{:022}", 60, 0))
        .unwrap();
    let answer = support::transact(&conn, &b.build()).await;
    assert_eq!(answer.get_str(39), Some("00"));
    assert_eq!(answer.get_str(48), Some("reversal=queued"));
    // No reversal leaves within 5 s of its record: wait for it.
    let reversed = || {
        sim.stats
            .reversals
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while reversed() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the reversal was handed to a survivor that never saw it owed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        node.switch
            .reversals
            .stats
            .handed_over
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
