//! Who may do what in a room, as Matrix's authorization rules say, for the
//! events this server's client API writes: joining (a public room, or an
//! invitation), inviting, leaving, kicking and banning, and state and messages
//! gated by the room's power levels. Pure functions over the room's current
//! state, so the writer can run them under the room's lock and tests can run
//! them alone.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The parts of a room's current state the rules read.
#[derive(Debug, Clone, Default)]
pub(crate) struct RoomState {
    /// `m.room.create`'s sender (the creator).
    pub(crate) creator: Option<String>,
    /// `m.room.join_rules`' content, if the room has one.
    pub(crate) join_rules: Option<Value>,
    /// `m.room.power_levels`' content, if the room has one.
    pub(crate) power_levels: Option<Value>,
    /// Each member's membership.
    pub(crate) memberships: BTreeMap<String, String>,
}

/// What a sender asks to write (one event).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Proposed<'a> {
    pub(crate) sender: &'a str,
    pub(crate) event_type: &'a str,
    pub(crate) state_key: Option<&'a str>,
    pub(crate) content: &'a Value,
}

/// Why a write is refused: the message a 403 carries.
pub(crate) type Refusal = String;

impl RoomState {
    fn membership(&self, user: &str) -> &str {
        self.memberships.get(user).map_or("leave", String::as_str)
    }

    /// The join rule; a room without `m.room.join_rules` is invite-only.
    fn join_rule(&self) -> &str {
        self.join_rules.as_ref().and_then(|rules| rules["join_rule"].as_str()).unwrap_or("invite")
    }

    /// A level of the power levels, or its default: with no power levels
    /// event, everyone may do everything but what needs a named level.
    fn level(&self, key: &str, default_with: i64, default_without: i64) -> i64 {
        match &self.power_levels {
            Some(levels) => levels[key].as_i64().unwrap_or(default_with),
            None => default_without,
        }
    }

    /// `user`'s power: its entry, else `users_default`; with no power levels
    /// event, the creator has 100 and everyone else 0.
    pub(crate) fn power_of(&self, user: &str) -> i64 {
        match &self.power_levels {
            Some(levels) => levels["users"][user]
                .as_i64()
                .unwrap_or_else(|| levels["users_default"].as_i64().unwrap_or(0)),
            None if self.creator.as_deref() == Some(user) => 100,
            None => 0,
        }
    }

    /// The level an event of `event_type` needs: its entry in `events`, else
    /// `state_default` (50; 0 without power levels) for state and
    /// `events_default` (0) for the rest.
    fn needed_for(&self, event_type: &str, is_state: bool) -> i64 {
        let named = self.power_levels.as_ref().and_then(|levels| levels["events"][event_type].as_i64());
        named.unwrap_or_else(|| {
            if is_state { self.level("state_default", 50, 0) } else { self.level("events_default", 0, 0) }
        })
    }
}

/// Whether `proposed` may be written into a room whose current state is `room`.
pub(crate) fn check(room: &RoomState, proposed: Proposed<'_>) -> Result<(), Refusal> {
    if proposed.event_type == "m.room.member" {
        return check_membership(room, proposed);
    }
    let sender = proposed.sender;
    if room.membership(sender) != "join" {
        return Err(format!("{sender} is not in the room"));
    }
    let needed = room.needed_for(proposed.event_type, proposed.state_key.is_some());
    let power = room.power_of(sender);
    if power < needed {
        return Err(format!("{sender} has power {power}; {} needs {needed}", proposed.event_type));
    }
    if proposed.event_type == "m.room.power_levels" {
        check_power_levels_change(room, sender, proposed.content)?;
    }
    Ok(())
}

fn check_membership(room: &RoomState, proposed: Proposed<'_>) -> Result<(), Refusal> {
    let sender = proposed.sender;
    let Some(target) = proposed.state_key else { return Err("a membership needs a state key".to_owned()) };
    let wanted = proposed.content["membership"].as_str().unwrap_or_default();
    let (sender_is, target_is) = (room.membership(sender), room.membership(target));
    if target_is == "ban" && wanted != "ban" && (target == sender || wanted != "leave") {
        return Err(format!("{target} is banned from the room"));
    }
    if target == sender {
        return match wanted {
            "join" if sender_is == "join" || sender_is == "invite" || room.join_rule() == "public" => Ok(()),
            "join" => Err("You are not invited to this room.".to_owned()),
            "leave" if sender_is == "join" || sender_is == "invite" => Ok(()),
            "leave" => Err(format!("{sender} is not in the room")),
            other => Err(format!("one cannot set one's own membership to {other:?}")),
        };
    }
    if sender_is != "join" {
        return Err(format!("{sender} is not in the room"));
    }
    let power = room.power_of(sender);
    let (needed, verb) = match wanted {
        "invite" => {
            if target_is == "join" || target_is == "invite" {
                return Err(format!("{target} is already {target_is}ed"));
            }
            (room.level("invite", 0, 0), "invite")
        }
        "leave" => (room.level("kick", 50, 50), "kick"),
        "ban" => (room.level("ban", 50, 50), "ban"),
        other => return Err(format!("one cannot set another's membership to {other:?}")),
    };
    if power < needed {
        return Err(format!("{sender} has power {power}; to {verb} needs {needed}"));
    }
    if verb != "invite" && room.power_of(target) >= power {
        return Err(format!("{sender} cannot {verb} {target}, whose power is not below theirs"));
    }
    Ok(())
}

/// A new power levels event may not give anyone more power than the sender
/// has, nor change the level of anyone else at or above the sender's.
fn check_power_levels_change(room: &RoomState, sender: &str, content: &Value) -> Result<(), Refusal> {
    let power = room.power_of(sender);
    let empty = serde_json::Map::new();
    let new_users = content["users"].as_object().unwrap_or(&empty);
    let old_users =
        room.power_levels.as_ref().and_then(|levels| levels["users"].as_object()).unwrap_or(&empty);
    for (user, level) in new_users.iter().chain(old_users.iter()) {
        let new = new_users.get(user).and_then(Value::as_i64);
        let old = old_users.get(user).and_then(Value::as_i64);
        if new == old {
            continue;
        }
        if new.is_some_and(|new| new > power) {
            return Err(format!("{sender} cannot give {user} more power than their own {power}"));
        }
        if user != sender && old.or_else(|| level.as_i64()).is_some_and(|old| old >= power) {
            return Err(format!("{sender} cannot change the power of {user}, at or above their own"));
        }
    }
    Ok(())
}

/// The power levels `createRoom` gives a room: Matrix's defaults, the creator
/// (and, in a trusted private chat, the invitees) at 100.
pub(crate) fn initial_power_levels(admins: &[&str]) -> Value {
    let users: serde_json::Map<String, Value> =
        admins.iter().map(|user| ((*user).to_owned(), json!(100))).collect();
    json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 0,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{Proposed, RoomState, check, initial_power_levels};

    const ALICE: &str = "@alice:x";
    const BOB: &str = "@bob:x";
    const CAROL: &str = "@carol:x";

    fn room(join_rule: &str, members: &[(&str, &str)]) -> RoomState {
        RoomState {
            creator: Some(ALICE.to_owned()),
            join_rules: Some(json!({"join_rule": join_rule})),
            power_levels: Some(initial_power_levels(&[ALICE])),
            memberships: members.iter().map(|(user, m)| ((*user).to_owned(), (*m).to_owned())).collect(),
        }
    }

    fn member(sender: &str, target: &str, membership: &str) -> (String, String, Value) {
        (sender.to_owned(), target.to_owned(), json!({"membership": membership}))
    }

    fn check_member(
        room: &RoomState,
        (sender, target, content): &(String, String, Value),
    ) -> Result<(), String> {
        check(room, Proposed { sender, event_type: "m.room.member", state_key: Some(target), content })
    }

    fn check_state(room: &RoomState, sender: &str, event_type: &str, content: &Value) -> Result<(), String> {
        check(room, Proposed { sender, event_type, state_key: Some(""), content })
    }

    #[test]
    fn joining_needs_a_public_room_or_an_invitation() {
        let private = room("invite", &[(ALICE, "join")]);
        assert!(check_member(&private, &member(BOB, BOB, "join")).is_err());
        let invited = room("invite", &[(ALICE, "join"), (BOB, "invite")]);
        assert!(check_member(&invited, &member(BOB, BOB, "join")).is_ok());
        assert!(check_member(&invited, &member(BOB, BOB, "leave")).is_ok(), "an invitation may be declined");
        assert!(check_member(&room("public", &[(ALICE, "join")]), &member(BOB, BOB, "join")).is_ok());
        let no_rules = RoomState { join_rules: None, ..private.clone() };
        assert!(check_member(&no_rules, &member(BOB, BOB, "join")).is_err(), "no join rules: invite only");
        let banned = room("public", &[(ALICE, "join"), (BOB, "ban")]);
        assert!(check_member(&banned, &member(BOB, BOB, "join")).is_err());
    }

    #[test]
    fn members_invite_and_moderators_kick_and_ban() {
        let room = room("invite", &[(ALICE, "join"), (BOB, "join")]);
        assert!(check_member(&room, &member(BOB, CAROL, "invite")).is_ok(), "invite needs 0");
        assert!(check_member(&room, &member(CAROL, BOB, "invite")).is_err(), "only members invite");
        assert!(check_member(&room, &member(ALICE, BOB, "invite")).is_err(), "already joined");
        assert!(check_member(&room, &member(BOB, ALICE, "leave")).is_err(), "kick needs 50");
        assert!(check_member(&room, &member(ALICE, BOB, "leave")).is_ok());
        assert!(check_member(&room, &member(ALICE, BOB, "ban")).is_ok());
    }

    #[test]
    fn state_needs_power_and_power_is_not_given_beyond_ones_own() {
        let room = room("invite", &[(ALICE, "join"), (BOB, "join")]);
        let topic = json!({"topic": "t"});
        assert!(check_state(&room, BOB, "m.room.topic", &topic).is_err(), "state needs 50");
        assert!(check_state(&room, ALICE, "m.room.topic", &topic).is_ok());
        assert!(
            check(
                &room,
                Proposed { sender: BOB, event_type: "m.room.message", state_key: None, content: &topic }
            )
            .is_ok()
        );
        let raise_bob = json!({"users": {ALICE: 100, BOB: 50}, "state_default": 50});
        assert!(check_state(&room, ALICE, "m.room.power_levels", &raise_bob).is_ok());
        assert!(check_state(&room, BOB, "m.room.power_levels", &raise_bob).is_err(), "power levels need 100");
        let mut room50 = room.clone();
        room50.power_levels =
            Some(json!({"users": {ALICE: 100, BOB: 50}, "events": {"m.room.power_levels": 50}}));
        let bob_to_100 = json!({"users": {ALICE: 100, BOB: 100}});
        assert!(
            check_state(&room50, BOB, "m.room.power_levels", &bob_to_100).is_err(),
            "not beyond one's own"
        );
        let demote_alice = json!({"users": {ALICE: 0, BOB: 50}});
        assert!(check_state(&room50, BOB, "m.room.power_levels", &demote_alice).is_err(), "not those above");
        assert!(check_state(&room, CAROL, "m.room.topic", &topic).is_err(), "not a member");
    }

    #[test]
    fn without_power_levels_the_creator_rules_and_members_set_state() {
        let mut room = room("public", &[(ALICE, "join"), (BOB, "join")]);
        room.power_levels = None;
        assert_eq!(room.power_of(ALICE), 100);
        assert!(check_state(&room, BOB, "m.room.topic", &json!({"topic": "t"})).is_ok());
    }
}
