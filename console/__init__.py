"""feedloop console: a web application where people rate, rank, compare and correct the live
policy's phrases, and judge two versions blind, side by side. A client of the gRPC server like
any app (feedloop.client), so it runs anywhere a client can reach the server."""
