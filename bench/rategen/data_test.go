package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestParseFramesFramesEachMessage(t *testing.T) {
	raw := []byte{3, 'a', 'b', 'c', 0, 1, 'z'}
	frames, err := parseFrames(raw)
	if err != nil {
		t.Fatal(err)
	}
	want := [][]byte{{0, 0, 0, 0, 3, 'a', 'b', 'c'}, {0, 0, 0, 0, 0}, {0, 0, 0, 0, 1, 'z'}}
	if len(frames) != len(want) {
		t.Fatalf("got %d frames, want %d", len(frames), len(want))
	}
	for i := range want {
		if !bytes.Equal(frames[i], want[i]) {
			t.Errorf("frame %d: got %v, want %v", i, frames[i], want[i])
		}
	}
}

func TestParseFramesRefusesTruncatedAndEmptyFiles(t *testing.T) {
	cases := map[string]struct {
		raw  []byte
		want string
	}{
		"truncated message": {[]byte{3, 'a', 'b', 'c', 5, 'x'}, "entry 1 at byte 4: length 5 runs past the end of the file (6 bytes)"},
		"truncated varint":  {[]byte{0x80}, "entry 0 at byte 0: the length is not a valid varint"},
		"empty":             {nil, "the file holds no message"},
	}
	for name, c := range cases {
		_, err := parseFrames(c.raw)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want %q", name, err, c.want)
		}
	}
}
