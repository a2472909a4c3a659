//! The wire codec: prost's, except that a message that does not decode (a string
//! field that is not UTF-8, a truncated field) is INVALID_ARGUMENT and names the
//! field. prost's codec answers INTERNAL, which reads as the driver's fault and
//! is what a CO retries; the caller's message is what needs changing.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// What `build.rs` names as the codec of every CSI service, server and client.
pub struct CsiCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for CsiCodec<T, U> {
    fn default() -> Self {
        CsiCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for CsiCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Checked<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Checked(self.0.decoder())
    }
}

/// prost's decoder, with its refusal turned into the caller's error.
pub struct Checked<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for Checked<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(invalid)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

fn invalid(s: Status) -> Status {
    if s.code() != Code::Internal {
        return s;
    }
    Status::invalid_argument(format!("{}; every string field must be UTF-8", s.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_decode_is_the_callers_error() {
        let s = invalid(Status::internal(
            "failed to decode Protobuf message: DeleteVolumeRequest.volume_id: invalid string value: data is not UTF-8 encoded",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().contains("DeleteVolumeRequest.volume_id"),
            "{}",
            s.message()
        );
        assert_eq!(invalid(Status::cancelled("gone")).code(), Code::Cancelled);
    }
}
