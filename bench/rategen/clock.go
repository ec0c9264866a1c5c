package main

import "time"

// A waiter blocks the sender until a time on the run's clock (nanoseconds since the run's base).
type waiter interface {
	name() string
	start(base time.Time) error
	waitUntil(at int64) error
}

// sleepWaiter uses the Go runtime's timers: portable, but on Linux a wait shorter than a
// millisecond can last a whole one, which shows as send lag.
type sleepWaiter struct{ base time.Time }

func newSleepWaiter() *sleepWaiter { return &sleepWaiter{} }

func (w *sleepWaiter) name() string { return "sleep" }

func (w *sleepWaiter) start(base time.Time) error {
	w.base = base
	return nil
}

func (w *sleepWaiter) waitUntil(at int64) error {
	time.Sleep(time.Duration(at) - time.Since(w.base))
	return nil
}
