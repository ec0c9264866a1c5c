package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
)

// loadFrames reads ghz's binary data file (-B): size-delimited messages, each a protobuf varint
// length then the message bytes. Each message is framed once as one uncompressed gRPC message
// (flag 0, 4-byte big-endian length), so that sending it costs no encoding.
func loadFrames(path string) ([][]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parseFrames(raw)
}

// maxMessageBytes bounds one message: gRPC servers refuse larger ones by default (4 MiB).
const maxMessageBytes = 4 << 20

func parseFrames(raw []byte) ([][]byte, error) {
	var frames [][]byte
	for off := 0; off < len(raw); {
		n, size := binary.Uvarint(raw[off:])
		if size <= 0 {
			return nil, fmt.Errorf("entry %d at byte %d: the length is not a valid varint", len(frames), off)
		}
		start := off + size
		if n > uint64(len(raw)-start) {
			return nil, fmt.Errorf("entry %d at byte %d: length %d runs past the end of the file (%d bytes)", len(frames), off, n, len(raw))
		}
		if n > maxMessageBytes {
			return nil, fmt.Errorf("entry %d at byte %d: length %d is above %d bytes", len(frames), off, n, maxMessageBytes)
		}
		frame := make([]byte, 5+n)
		binary.BigEndian.PutUint32(frame[1:5], uint32(n))
		copy(frame[5:], raw[start:start+int(n)])
		frames = append(frames, frame)
		off = start + int(n)
	}
	if len(frames) == 0 {
		return nil, errors.New("the file holds no message")
	}
	return frames, nil
}
