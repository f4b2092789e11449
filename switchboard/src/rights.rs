//! Handle rights (docs/PROTOCOL.md §6).

use flower_proto::Status;
use flower_proto::switchboard::Right;

use crate::labels::key_list;

/// A set of rights, as a bit set indexed by the enum value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights(u8);

impl Rights {
    pub const ALL: Rights = Rights(0b11_1111);
    pub const NONE: Rights = Rights(0);

    pub fn of(rights: &[Right]) -> Rights {
        Rights(rights.iter().fold(0, |bits, r| bits | 1 << *r as u8))
    }

    /// From the raw enum values of a request; unknown values are refused.
    pub fn from_wire(values: &[i32]) -> Result<Rights, Status> {
        let mut bits = 0u8;
        for &v in values {
            let right = Right::try_from(v)
                .map_err(|_| Status::invalid_argument(format!("Unknown right {v}")))?;
            bits |= 1 << right as u8;
        }
        Ok(Rights(bits))
    }

    pub fn contains(self, right: Right) -> bool {
        self.0 & (1 << right as u8) != 0
    }

    /// Fails with the documented error unless every right in `wanted` is held.
    pub fn require(self, wanted: Rights) -> Result<(), Status> {
        let missing: Vec<&str> = Right::ALL
            .iter()
            .filter(|r| wanted.contains(**r) && !self.contains(**r))
            .map(|r| r.as_str_name())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "Rights {} are not present on this handle",
                key_list(&missing)
            )))
        }
    }

    pub fn require_one(self, right: Right) -> Result<(), Status> {
        self.require(Rights::of(&[right]))
    }

    pub fn to_vec(self) -> Vec<Right> {
        Right::ALL
            .into_iter()
            .filter(|r| self.contains(*r))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_rights_are_named_in_enum_order() {
        let held = Rights::of(&[Right::ClientConnect, Right::List]);
        let err = held
            .require(Rights::of(&[
                Right::IngressConnect,
                Right::List,
                Right::EgressStart,
            ]))
            .unwrap_err();
        assert_eq!(
            err.message,
            r#"Rights ["EGRESS_START","INGRESS_CONNECT"] are not present on this handle"#
        );
        assert!(held.require(Rights::NONE).is_ok());
    }

    #[test]
    fn unknown_wire_values_are_refused() {
        assert!(Rights::from_wire(&[0, 5]).is_ok());
        assert_eq!(
            Rights::from_wire(&[6]).unwrap_err().message,
            "Unknown right 6"
        );
        assert_eq!(Rights::from_wire(&[]).unwrap(), Rights::NONE);
    }

    #[test]
    fn any_subset_is_accepted_and_any_superset_refused() {
        // Exhaustive over all 64 × 64 pairs: a derived set passes exactly when it is a subset.
        for held in 0u8..64 {
            for wanted in 0u8..64 {
                let ok = Rights(held).require(Rights(wanted)).is_ok();
                assert_eq!(
                    ok,
                    wanted & !held == 0,
                    "held {held:06b} wanted {wanted:06b}"
                );
            }
        }
    }
}
