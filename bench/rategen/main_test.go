package main

import (
	"testing"

	"golang.org/x/net/http2/hpack"
)

func TestHeaderBlockDecodesAloneAndAgain(t *testing.T) {
	block := headerBlock("127.0.0.1:50051")
	var got []hpack.HeaderField
	dec := hpack.NewDecoder(4096, func(f hpack.HeaderField) { got = append(got, f) })
	// The same decoder twice: the block must not depend on what the table held before.
	for round := range 2 {
		got = nil
		if _, err := dec.Write(block); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if err := dec.Close(); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		want := map[string]string{":method": "POST", ":scheme": "http", ":authority": "127.0.0.1:50051", ":path": checkPath, "content-type": "application/grpc", "te": "trailers", "user-agent": "keygate-rategen"}
		if len(got) != len(want) {
			t.Fatalf("round %d: got %d fields, want %d: %v", round, len(got), len(want), got)
		}
		for _, f := range got {
			if want[f.Name] != f.Value {
				t.Errorf("round %d: %s = %q, want %q", round, f.Name, f.Value, want[f.Name])
			}
		}
	}
}

func TestParseOptionsNamesTheBadFlag(t *testing.T) {
	base := []string{"-port", "1", "-data", "x.bin", "-rate", "10"}
	cases := map[string][]string{
		"-port: must be 1 to 65535":        {"-port", "0", "-data", "x.bin", "-rate", "10"},
		"-rate: must be above 0":           {"-port", "1", "-data", "x.bin", "-rate", "0"},
		"-data: a data file is required":   {"-port", "1", "-rate", "10"},
		"-connections: must be at least 1": append(append([]string{}, base...), "-connections", "0"),
		"-timeout: must be above 0":        append(append([]string{}, base...), "-timeout", "0s"),
		"-concurrency: must be at least 1": {"-port", "1", "-data", "x.bin", "-concurrency", "-2"},
		"-requests: only with -concurrency (the open loop sends -rate x -duration)": append(append([]string{}, base...), "-requests", "5"),
		"-requests: must be 0 (no limit) or more":                                   {"-port", "1", "-data", "x.bin", "-concurrency", "8", "-requests", "-1"},
		"-rate and -concurrency: give one, not both (open or closed loop)":          append(append([]string{}, base...), "-concurrency", "8"),
	}
	for want, args := range cases {
		if _, err := parseOptions(args); err == nil || err.Error() != want {
			t.Errorf("%v: got %v, want %q", args, err, want)
		}
	}
	for _, ok := range [][]string{base, {"-port", "1", "-data", "x.bin", "-concurrency", "64"}, {"-port", "1", "-data", "x.bin", "-concurrency", "64", "-requests", "1000"}} {
		if _, err := parseOptions(ok); err != nil {
			t.Errorf("%v: %v", ok, err)
		}
	}
}
