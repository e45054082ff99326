"""Avro: the schema-compiled batch codecs, schema resolution and the Schema Registry wire format."""
