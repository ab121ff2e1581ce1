"""A real client library's flow against a running deployment: matrix-nio
(`pip install matrix-nio`), as a person's client would drive the server.

    python3 tests/clients/nio_flow.py http://127.0.0.1:8008 [more base URLs…]

With several URLs (the processes of a deployment), each step goes to the
next one. It registers alice and bob, logs both in, creates a private room
inviting bob, whom sync shows the invitation; bob joins; 15 messages; a
limited sync and the history before it through /messages; a profile, the
members, the devices; and alice logs out everywhere. Every answer is parsed
by nio's own response schemas, so a shape clients reject shows as an error.
Not part of `cargo xtask ci`: it needs Python and PyPI.
"""

import asyncio
import sys

from nio import AsyncClient, SyncResponse


def on(url, base):
    """The same signed-in user, talking to another process."""
    client = AsyncClient(url, base.user_id)
    client.access_token, client.user_id, client.device_id = base.access_token, base.user_id, base.device_id
    return client


async def main(urls):
    at = lambda n: urls[n % len(urls)]
    for name in ["alice", "bob"]:
        client = AsyncClient(at(0), name)
        print("register", name, type(await client.register(name, "a long passphrase", device_name="nio")).__name__)
        await client.close()
    alice = AsyncClient(at(1), "alice")
    print("login alice", type(await alice.login("a long passphrase", device_name="nio laptop")).__name__)
    bob = AsyncClient(at(2), "bob")
    print("login bob", type(await bob.login("a long passphrase")).__name__)
    created = await alice.room_create(name="nio room", invite=[bob.user_id])
    print("createRoom", type(created).__name__)
    await asyncio.sleep(0.3)
    synced = await bob.sync(timeout=0)
    print("bob's invitations", list(synced.rooms.invite) if isinstance(synced, SyncResponse) else synced)
    print("bob joins", type(await bob.join(created.room_id)).__name__)
    for n in range(15):
        client = on(at(n), alice)
        await client.room_send(created.room_id, "m.room.message", {"msgtype": "m.text", "body": f"message {n}"})
        await client.close()
    client = on(at(3), bob)
    synced = await client.sync(timeout=0, sync_filter={"room": {"timeline": {"limit": 5}}})
    room = synced.rooms.join[created.room_id]
    print("limited", room.timeline.limited, [getattr(e, "body", type(e).__name__) for e in room.timeline.events])
    history = await client.room_messages(created.room_id, start=room.timeline.prev_batch, limit=50)
    print("history", type(history).__name__, [getattr(e, "body", type(e).__name__) for e in history.chunk])
    print("profile", type(await client.get_profile(alice.user_id)).__name__)
    print("members", type(await client.joined_members(created.room_id)).__name__)
    print("devices", type(await client.devices()).__name__)
    await client.close()
    print("logout all", type(await alice.logout(all_devices=True)).__name__)
    await alice.close()
    await bob.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:] or ["http://127.0.0.1:8008"]))
