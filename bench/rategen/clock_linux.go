package main

import (
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// timerfdWaiter wakes the sender at an absolute CLOCK_MONOTONIC time through a timerfd the Go
// netpoller watches. The runtime's own timers sleep in epoll_wait with millisecond timeouts, so a
// 333 µs gap (3,000/s) would be slept as up to a whole millisecond; a timerfd fires on time.
type timerfdWaiter struct {
	fd       int
	file     *os.File
	monoBase int64
	buf      [8]byte
}

func newWaiter() (waiter, error) {
	fd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC)
	if err != nil {
		return newSleepWaiter(), nil
	}
	return &timerfdWaiter{fd: fd, file: os.NewFile(uintptr(fd), "timerfd")}, nil
}

func (w *timerfdWaiter) name() string { return "timerfd" }

// start ties the run's clock (nanoseconds since base, Go's monotonic reading, which is
// CLOCK_MONOTONIC on Linux) to the kernel's CLOCK_MONOTONIC.
func (w *timerfdWaiter) start(base time.Time) error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return err
	}
	w.monoBase = ts.Nano() - int64(time.Since(base))
	return nil
}

func (w *timerfdWaiter) waitUntil(at int64) error {
	spec := unix.ItimerSpec{Value: unix.NsecToTimespec(w.monoBase + at)}
	if err := unix.TimerfdSettime(w.fd, unix.TFD_TIMER_ABSTIME, &spec, nil); err != nil {
		return err
	}
	_, err := w.file.Read(w.buf[:])
	return err
}
