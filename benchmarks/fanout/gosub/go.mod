module fanout/gosub

go 1.22
