//go:build !linux

package main

func newWaiter() (waiter, error) { return newSleepWaiter(), nil }
