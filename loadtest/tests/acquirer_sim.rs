//! The acquirer simulator over real loopback sockets, spoken to by a payswitch-net client.

mod common;

use bytes::BytesMut;
use common::*;
use payswitch_loadtest::acquirer_sim::{SimConfig, CARD_LIMIT_MAX_MINOR};
use payswitch_net::framed::{write_frame, write_message};
use payswitch_net::{codes, FrameReader};
use payswitch_protocol::{fields, Message, Mti, ResponseCode};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approves_a_valid_authorization_with_an_approval_code() {
    bounded(async {
        let sim = sim(SimConfig {
            approval_rate: 1.0,
            name: "acq-a".into(),
            ..SimConfig::default()
        })
        .await;
        let (_endpoint, connection) = connect(&sim).await;
        let request = request(&card(1, &future_expiry()), 12_500, 1);
        let response = exchange(&connection, &request).await;
        assert_eq!(response.mti(), Mti::AUTHORIZATION_RESPONSE);
        assert_eq!(response.get_str(fields::RESPONSE_CODE), Some("00"));
        let approval = response.get_str(fields::APPROVAL_CODE).expect("field 38");
        assert_eq!(approval.len(), 6);
        for n in fields::ECHOED {
            assert_eq!(response.get(n), request.get(n), "field {n} echoed");
        }
        assert_eq!(
            response.get_str(fields::PRIVATE_DATA),
            Some("acquirer=acq-a")
        );
        // The same request gets the same answer.
        let again = exchange(&connection, &request).await;
        assert_eq!(again.get_str(fields::APPROVAL_CODE), Some(approval));
        assert_eq!(sim.stats.answered_with(ResponseCode::Approved), 2);
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declines_expired_card_54_over_limit_51_and_at_rate_zero_05() {
    bounded(async {
        let sim = sim(SimConfig {
            approval_rate: 0.0,
            ..SimConfig::default()
        })
        .await;
        let (_endpoint, connection) = connect(&sim).await;
        let code = |m: &Message| m.get_str(fields::RESPONSE_CODE).map(str::to_owned);

        let expired = exchange(&connection, &request(&card(2, &past_expiry()), 1_000, 1)).await;
        assert_eq!(code(&expired).as_deref(), Some("54"));
        assert!(!expired.has(fields::APPROVAL_CODE));

        let valid = card(3, &future_expiry());
        let over = exchange(&connection, &request(&valid, CARD_LIMIT_MAX_MINOR + 1, 2)).await;
        assert_eq!(code(&over).as_deref(), Some("51"));

        let declined = exchange(&connection, &request(&valid, 1_000, 3)).await;
        assert_eq!(code(&declined).as_deref(), Some("05"));
        assert!(!declined.has(fields::APPROVAL_CODE));

        let declines = sim.stats.declines();
        assert_eq!((declines["54"], declines["51"], declines["05"]), (1, 1, 1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_network_reversal_format_errors_and_unsupported_mtis() {
    bounded(async {
        let sim = sim(SimConfig::default()).await;
        let (_endpoint, connection) = connect(&sim).await;

        let echo = Message::builder(Mti::NETWORK_REQUEST)
            .set_str(7, "1125123045")
            .unwrap()
            .set_str(11, "000042")
            .unwrap()
            .set_str(70, "301")
            .unwrap()
            .build();
        let response = exchange(&connection, &echo).await;
        assert_eq!(response.mti(), Mti::NETWORK_RESPONSE);
        assert_eq!(response.get_str(39), Some("00"));
        for n in [7, 11, 70] {
            assert_eq!(response.get(n), echo.get(n), "field {n}");
        }

        let auth = request(&card(4, &future_expiry()), 500, 7);
        let reversal = Message::builder(Mti::REVERSAL_REQUEST)
            .copy_from(&auth, &fields::ECHOED)
            .unwrap()
            .build();
        let response = exchange(&connection, &reversal).await;
        assert_eq!(response.mti().as_str(), "0410");
        assert_eq!(response.get_str(39), Some("00"));

        let mut missing_amount = Message::builder(Mti::AUTHORIZATION_REQUEST);
        missing_amount
            .copy_from(&auth, &[2, 3, 7, 11, 14, 37, 41, 42, 49])
            .unwrap();
        let response = exchange(&connection, &missing_amount.build()).await;
        assert_eq!(response.get_str(39), Some("30"));
        assert_eq!(
            response.get(11),
            auth.get(11),
            "what could be read is echoed"
        );

        let mut unsupported = Message::builder(Mti::parse(b"0300").unwrap());
        unsupported.copy_from(&auth, &fields::ECHOED).unwrap();
        let response = exchange(&connection, &unsupported.build()).await;
        assert_eq!(
            (response.mti().as_str(), response.get_str(39)),
            ("0310", Some("12"))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frame_resets_its_stream_and_the_connection_goes_on() {
    bounded(async {
        let sim = sim(SimConfig::default()).await;
        let (_endpoint, connection) = connect(&sim).await;
        // A second stream opened before the bad one, still in use after it.
        let (mut good_send, good_recv) = connection.open_bi().await.unwrap();

        let (mut bad_send, mut bad_recv) = connection.open_bi().await.unwrap();
        write_frame(&mut bad_send, b"hello, not ISO 8583", &mut BytesMut::new())
            .await
            .unwrap();
        bad_send.finish().unwrap();
        match bad_recv.read_to_end(1024).await {
            Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
                assert_eq!(code.into_inner(), u64::from(codes::GARBAGE_FRAME));
            }
            other => panic!("expected a reset with GARBAGE_FRAME, got {other:?}"),
        }

        let request = request(&card(5, &future_expiry()), 700, 9);
        write_message(&mut good_send, &request, &mut BytesMut::new())
            .await
            .unwrap();
        good_send.finish().unwrap();
        let frame = FrameReader::new(good_recv, 8192)
            .next_frame()
            .await
            .unwrap()
            .expect("the other stream is still answered");
        let response = Message::decode(frame).unwrap();
        assert_eq!(response.get(11), request.get(11));
        // And a new stream on the same connection works too.
        let response = exchange(&connection, &request).await;
        assert_eq!(response.mti(), Mti::AUTHORIZATION_RESPONSE);
        assert_eq!(
            sim.stats
                .unanswerable
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_pipelined_requests_over_tcp() {
    bounded(async {
        let sim = sim(SimConfig {
            approval_rate: 1.0,
            ..SimConfig::default()
        })
        .await;
        let tcp_addr = sim.tcp_addr.expect("TCP is served");
        let stream = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
        let (read, mut write) = stream.into_split();
        let valid = card(6, &future_expiry());
        let requests: Vec<Message> = (1..=20).map(|stan| request(&valid, 100, stan)).collect();
        let mut scratch = BytesMut::new();
        for r in &requests {
            write_message(&mut write, r, &mut scratch).await.unwrap();
        }
        write.shutdown().await.unwrap();
        let mut frames = FrameReader::new(read, 8192);
        let mut stans = Vec::new();
        while let Some(frame) = frames.next_frame().await.unwrap() {
            let response = Message::decode(frame).unwrap();
            assert_eq!(response.get_str(39), Some("00"));
            stans.push(response.get_str(11).unwrap().to_owned());
        }
        stans.sort();
        let mut expected: Vec<String> = requests
            .iter()
            .map(|r| r.get_str(11).unwrap().to_owned())
            .collect();
        expected.sort();
        assert_eq!(stans, expected, "every request answered once");
    })
    .await;
}
