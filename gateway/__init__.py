"""The gateway: front ends, validation, routing with slot reservations, stream state."""
