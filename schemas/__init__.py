"""Switchboard wire types: msgspec Structs, NATS subjects and the JSON codec. No I/O."""
