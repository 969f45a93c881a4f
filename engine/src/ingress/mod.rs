//! What the switch does with a frame before the card's shard: decode, classify, validate,
//! and the request's duplicate key. Performs no I/O; the switch calls it on each
//! stream's task in the order frames are read, the simulator on its own.

use payswitch_protocol::{fields, DecodeError, Message, ResponseCode};

pub mod key;
pub mod validate;

use crate::ingress::validate::as_code;
use key::DupKey;
use validate::{Authorization, Kind};

/// What to do with a decoded frame.
// One per frame, moved once: boxing the request would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Admission {
    /// Not an ISO 8583 message: end the stream, answering nothing.
    Close,
    /// Answered by the switch itself (network management, or refused by validation).
    Answer([u8; 2], Message),
    /// A valid authorization or reversal, for its card's shard.
    Admit {
        /// The request.
        request: Message,
        /// Its parsed fields.
        auth: Authorization,
        /// A 0400/0420.
        reversal: bool,
        /// What identifies it among retransmissions.
        key: DupKey,
    },
}

/// Decides what a frame is. `decoded` is `Message::decode_prefix`'s result; `validated`
/// is called between classification and validation (for the driver's stage timings).
pub fn admit(
    decoded: Result<(Message, Option<DecodeError>), DecodeError>,
    validated: impl FnOnce(),
) -> Admission {
    let (request, error) = match decoded {
        Ok(decoded) => decoded,
        // Not even an MTI and bitmap: nothing to answer.
        Err(_) => return Admission::Close,
    };
    if error.is_some() {
        return refuse(&request, ResponseCode::FormatError);
    }
    let kind = validate::classify(request.mti());
    match kind {
        Kind::Network => {
            let response = validate::respond_network(&request);
            let code = response
                .get(fields::RESPONSE_CODE)
                .and_then(|c| c.try_into().ok())
                .unwrap_or(*b"96");
            Admission::Answer(code, response)
        }
        Kind::Unsupported => refuse(&request, ResponseCode::InvalidTransaction),
        Kind::Authorization | Kind::Reversal => {
            let auth = validate::validate(&request);
            validated();
            let auth = match auth {
                Ok(auth) => auth,
                Err(code) => return refuse(&request, code),
            };
            let reversal = kind == Kind::Reversal;
            match DupKey::of(&request, reversal) {
                Some(key) => Admission::Admit {
                    request,
                    auth,
                    reversal,
                    key,
                },
                // Validation requires every field of the key, so this is not reached.
                None => refuse(&request, ResponseCode::FormatError),
            }
        }
    }
}

/// The answer `code` to `request`, built by the switch.
pub fn refuse(request: &Message, code: ResponseCode) -> Admission {
    let code = as_code(code);
    Admission::Answer(code, validate::respond(request, &code, None, ""))
}

/// Field 48 of an answer shed at the door.
pub const SHED_TAGS: &str = "shed=overload";

/// The immediate answer to `frame`, read while its stream or connection is at its
/// in-flight bound: 91 without doing the request (a network message is still answered as
/// usual). `None` when the frame is not even a message (the stream is closed). A shed
/// request reached no shard, no journal and no acquirer, so it leaves no record: the
/// gateway was told 91 and nothing happened that would need reversing.
pub fn shed(frame: bytes::Bytes) -> Option<Message> {
    let (request, _) = Message::decode_prefix(frame).ok()?;
    Some(match validate::classify(request.mti()) {
        Kind::Network => validate::respond_network(&request),
        _ => validate::respond(
            &request,
            &as_code(ResponseCode::IssuerInoperative),
            None,
            SHED_TAGS,
        ),
    })
}
